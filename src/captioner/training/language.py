"""Language pretraining: the decoder first learns to write captions from text alone.

With ``language_text`` set, a new run starts with ``language_epochs`` passes over that file's
sentences (one per line, e.g. Flickr30k's 145k captions from ``scripts/flickr30k_text.py``) before its
first image epoch. The decoder reads them as captions of a blank image: one feature region of zeros,
so its image projections add only their biases and the attention has nothing to choose; the word
embedding, the LSTM and the output layer learn the language. Then image training starts from those
weights with its own optimiser, as a run without the phase starts from random ones.

The sentences are encoded with the prepared vocabulary (other words become ``<unk>``). A sentence
that is also a validation or test reference of the prepared set (after tokenising) is left out, so a
text drawn from a superset of the photos cannot teach the model its evaluation captions.

The phase happens only in a new run, before anything is saved: every checkpoint, and so every
resume, comes after it. A run stopped during the phase has saved nothing yet and is started again
as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from captioner.data.prepare import PreparedDataset
from captioner.data.vocabulary import Vocabulary, tokenize
from captioner.errors import ConfigError
from captioner.models.captioner import Captioner
from captioner.threads import on_free_cores
from captioner.training.config import TrainConfig
from captioner.training.optimization import Optimization

#: The largest language text read (its sentences are held in memory, encoded).
MAX_LANGUAGE_TEXT_BYTES = 1 << 30
#: The longest sentence kept, in words (as ``captioner prepare``'s default).
MAX_SENTENCE_WORDS = 50


class LanguageText:
    """The sentences of a text file, encoded: ``tokens`` (N, L) int64 padded, ``lengths`` (N,)."""

    def __init__(self, tokens: torch.Tensor, lengths: torch.Tensor, *, read: int, evaluation_captions: int, too_long: int) -> None:
        self.tokens, self.lengths = tokens, lengths
        self.read, self.evaluation_captions, self.too_long = read, evaluation_captions, too_long

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def read_file(cls, path: str | Path, vocab: Vocabulary, evaluation_references: list[str]) -> LanguageText:
        """Read ``path`` (UTF-8, one sentence per line), leaving out any sentence that tokenises the
        same as one of ``evaluation_references`` and any over :data:`MAX_SENTENCE_WORDS` words."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"language_text {path} does not exist")
        if path.stat().st_size > MAX_LANGUAGE_TEXT_BYTES:
            raise ConfigError(f"language_text {path} is {path.stat().st_size / 2**30:.1f} GiB; at most 1 GiB of text is read")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ConfigError(f"language_text {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        held_out = {tuple(tokenize(caption)) for caption in evaluation_references}
        encoded, evaluation_captions, too_long, read = [], 0, 0, 0
        for line in lines:
            words = tokenize(line)
            if not words:
                continue
            read += 1
            if tuple(words) in held_out:
                evaluation_captions += 1
            elif len(words) > MAX_SENTENCE_WORDS:
                too_long += 1
            else:
                encoded.append(vocab.encode(words))
        if not encoded:
            raise ConfigError(f"language_text {path} has no sentences to learn from ({read} read, {evaluation_captions} of them evaluation captions)")
        width = max(len(ids) for ids in encoded)
        tokens = torch.full((len(encoded), width), vocab.pad_id, dtype=torch.long)
        for row, ids in enumerate(encoded):
            tokens[row, : len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([len(ids) for ids in encoded])
        return cls(tokens, lengths, read=read, evaluation_captions=evaluation_captions, too_long=too_long)

    def batches(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """One epoch's batches: row indices in a random order drawn from ``generator``."""
        return list(torch.randperm(len(self), generator=generator).split(batch_size))


def text_loss(model: Captioner, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the captions read as captions of a blank image (one region of zeros)."""
    width = int(lengths.max())
    tokens = tokens[:, :width]
    blank = tokens.new_zeros((len(tokens), 1, model.encoder.feature_dim), dtype=torch.float32)
    logits = model.decoder(blank, tokens, lengths).logits  # (B, T-1, V)
    targets = tokens[:, 1 : logits.shape[1] + 1]
    mask = targets != model.vocab.pad_id
    return F.cross_entropy(logits[mask].float(), targets[mask])


@torch.no_grad()
def blank_image_loss(model: Captioner, dataset: PreparedDataset, split: str, device: torch.device, batch_size: int = 500) -> float:
    """``split``'s captions' cross-entropy read without their images: how well the decoder knows the language alone."""
    captions = dataset.captions(split)
    tokens, lengths = torch.from_numpy(captions["tokens"]).long(), torch.from_numpy(captions["lengths"]).long()
    model.eval()
    total = count = 0.0
    for start in range(0, len(lengths), batch_size):
        rows = slice(start, start + batch_size)
        words = float((lengths[rows] - 1).sum())
        total += float(text_loss(model, tokens[rows].to(device), lengths[rows].to(device))) * words
        count += words
    return total / max(count, 1.0)


def pretrain_language(
    model: Captioner, config: TrainConfig, dataset: PreparedDataset, device: torch.device, log: Callable[[str], None], *, progress: bool = False
) -> None:
    """``config.language_epochs`` passes over ``config.language_text``: a fresh :class:`Optimization`
    of the run's settings (Adam at ``decoder_lr``, warm-up, clipping, mixed precision), its own random order
    (``config.seed``). Logs each epoch's loss and the validation captions' loss without their images;
    ``progress`` shows a bar."""
    references = [caption for split in ("val", "test") for captions in dataset.references(split).values() for caption in captions]
    text = LanguageText.read_file(config.language_text, model.vocab, references)
    log(
        f"language pretraining on {len(text):,d} sentences of {config.language_text}"
        + (f" ({text.evaluation_captions:,d} left out as validation or test captions of {Path(dataset.root).name})" if text.evaluation_captions else "")
        + (f" ({text.too_long:,d} over {MAX_SENTENCE_WORDS} words left out)" if text.too_long else "")
    )
    optimization = Optimization.for_run(model, config, device)  # the run's optimiser settings, a fresh Adam of its own
    generator = torch.Generator().manual_seed(config.seed)
    log(f"  before: validation captions without their images {blank_image_loss(model, dataset, 'val', device):.3f}")
    for epoch in range(config.language_epochs):
        model.train()
        total, steps, start = 0.0, 0, time.perf_counter()
        batches = text.batches(config.language_batch_size, generator)
        bar = tqdm(batches, desc=f"language epoch {epoch + 1}/{config.language_epochs}", unit="batch", disable=not progress or None, leave=False)
        for rows in on_free_cores(bar):
            with optimization.precision.autocast:
                loss = text_loss(model, text.tokens[rows].to(device), text.lengths[rows].to(device))
            if not math.isfinite(float(loss.detach())):
                continue  # as nan_policy "skip"; the image phase applies the run's policy
            optimization.backward(loss)
            optimization.step()
            total, steps = total + float(loss.detach()), steps + 1
        seconds = time.perf_counter() - start
        log(
            f"  language epoch {epoch + 1}/{config.language_epochs}: loss {total / max(steps, 1):.3f}, "
            f"validation captions without their images {blank_image_loss(model, dataset, 'val', device):.3f} ({len(text) / max(seconds, 1e-9):.0f} sentences/s)"
        )
    model.train()
