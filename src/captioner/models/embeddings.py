"""Pretrained word vectors (GloVe / word2vec text format) for the decoder's embedding."""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.data.vocabulary import Vocabulary
from captioner.errors import ConfigError


def load_word_vectors(path: str | Path, vocab: Vocabulary, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``word v1 .. v_dim`` lines; return vectors (V, dim) and found (V,) for the vocabulary's words.

    A word2vec-style first line ``count dim`` is skipped. Words not in the file keep a zero row and
    ``found`` False (the caller keeps their random initialisation). Reading streams the file, so
    multi-GB GloVe files cost no more memory than the vocabulary's rows.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"word vector file {path} does not exist")
    vectors = torch.zeros(len(vocab), dim)
    found = torch.zeros(len(vocab), dtype=torch.bool)
    checked = False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip().split(" ")
            if not line.strip():
                continue
            if line_number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                if int(parts[1]) != dim:
                    raise ConfigError(f"{path} holds {parts[1]}-dimensional vectors, but embed_dim is {dim}")
                continue
            if not checked:  # the first vector tells the file's dimension
                file_dim = len(parts) - 1
                if file_dim != dim:
                    raise ConfigError(f"{path} holds {file_dim}-dimensional vectors, but embed_dim is {dim}")
                checked = True
            if len(parts) < dim + 1:
                raise ConfigError(f"{path}:{line_number}: expected a word and {dim} numbers, found {len(parts) - 1}")
            word = " ".join(parts[:-dim])  # a few GloVe words contain spaces
            index = vocab.index.get(word.lower())
            if index is None or found[index]:
                continue
            try:
                vectors[index] = torch.tensor([float(x) for x in parts[-dim:]])
            except ValueError:
                raise ConfigError(f"{path}:{line_number}: not a number in the vector of {word!r}") from None
            found[index] = True
    return vectors, found
