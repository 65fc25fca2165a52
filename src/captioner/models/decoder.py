"""What every caption decoder shares: its config, its state, and the step interface decoding uses.

A decoder turns image features (B, P, D) into words. Training calls ``forward`` (teacher forcing);
decoding calls ``init_state`` once per image and then ``step`` once per generated word, reordering
the state between steps for beam search. The state is a plain ``dict`` of tensors whose first
dimension is the batch, so one function reorders or expands any decoder's state. Entries that
depend only on the image (``image_constant_keys``) may keep one row per image while the others have
one per beam: B images x k beams, each image's k rows together; the step derives k from the shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from captioner import ranges
from captioner.errors import ConfigError

DecoderState = dict[str, torch.Tensor]

DECODER_KINDS = ("attention", "show_tell")
#: Where a decoder's words live. "learned": an embedding and an output layer of its own, trained.
#: "glove-50d": the shipped GloVe 6B 50-d vectors, fixed, as its embedding and, through a learned
#: projection, its output layer (logits_w = g_w . U x + b_w; Anderson et al. 2017's fixed
#: embeddings in and out), so a word it never saw can be added at load time with its own vector.
WORD_SPACES = ("learned", "glove-50d")
GLOVE_DIM = 50
ATTENTION_KINDS = ("soft", "hard")
#: How a hard-attention decoder reads the image when it decodes (and in teacher-forced validation):
#: the expected feature under its weights, or the feature at their likeliest region.
HARD_DECODING = ("expected", "argmax")
#: What ``forward`` may be asked to do with a hard-attention decoder's locations in training.
HARD_TRAINING = ("sample", "expected")
MAX_WIDTH = 8192  # embedding, hidden and attention sizes: a 512-wide LSTM is the classic captioner


@dataclass
class DecoderConfig:
    kind: str = "attention"  # "attention": Show, Attend and Tell; "show_tell": Show and Tell
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512  # attention only
    attention: str = "soft"  # attention only: "soft" (expected feature) or "hard" (one sampled region per word, Xu et al. section 4.1)
    hard_decoding: str = "expected"  # hard attention only: decode with the "expected" feature or the "argmax" region
    dropout: float = 0.5
    image_input: str = "init_state"  # show_tell only: "init_state" (project into h0/c0) or "first_step" (feed as input x_-1)
    deep_output: bool = False  # attention only: logits from embedding + hidden + context, as in Xu et al. eq. 7
    freeze_embeddings: bool = False
    word_space: str = "learned"  # or "glove-50d" (WORD_SPACES): fixed pretrained vectors in and out; embed_dim 50

    def __post_init__(self) -> None:
        if self.kind not in DECODER_KINDS:
            raise ConfigError(f"decoder kind must be one of {', '.join(DECODER_KINDS)}, not {self.kind!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_KINDS)}, not {ranges.shown(self.attention)}")
        if self.hard_decoding not in HARD_DECODING:
            raise ConfigError(f"hard_decoding must be one of {', '.join(HARD_DECODING)}, not {ranges.shown(self.hard_decoding)}")
        if self.attention == "hard" and self.kind != "attention":
            raise ConfigError(f"hard attention needs the attention decoder, not {self.kind!r}")
        if self.image_input not in ("init_state", "first_step"):
            raise ConfigError(f"image_input must be 'init_state' or 'first_step', not {self.image_input!r}")
        for name in ("embed_dim", "hidden_dim", "attention_dim"):
            ranges.whole_number(name, getattr(self, name), 1, MAX_WIDTH)
        self.dropout = ranges.number("dropout", self.dropout, 0.0, 1.0)
        if self.dropout == 1.0:
            raise ranges.SettingError("dropout", "must be below 1 (1 drops everything)")
        for name in ("deep_output", "freeze_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ranges.SettingError(name, f"must be true or false, not {ranges.shown(getattr(self, name))}")
        if self.word_space not in WORD_SPACES:
            raise ConfigError(f"word_space must be one of {', '.join(WORD_SPACES)}, not {ranges.shown(self.word_space)}")
        if self.word_space == "glove-50d" and self.embed_dim != GLOVE_DIM:
            raise ranges.SettingError("embed_dim", f"must be {GLOVE_DIM} with word_space = \"glove-50d\" (the vectors are the embedding), not {self.embed_dim}")

    @property
    def fixed_embedding(self) -> bool:
        """Whether training leaves the embedding as it is (frozen pretrained vectors, or GloVe's own)."""
        return self.freeze_embeddings or self.word_space != "learned"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown decoder setting(s): {', '.join(sorted(unknown))}")
        return cls(**values)


class DecoderOutput(NamedTuple):
    """What teacher forcing gives: logits (B, T-1, V); attention (B, T-1, P) for attention decoders
    (the weights over the regions, zero past each caption's end), else None; and for a hard-attention
    decoder whose locations were sampled, the region each step read (B, T-1), -1 past the end."""

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    locations: torch.Tensor | None = None


class Decoder(nn.Module):
    """Base class: subclasses implement ``init_state``, ``step`` and ``forward``."""

    config: DecoderConfig
    vocab_size: int
    feature_dim: int
    has_attention: bool = False
    #: State entries that depend only on the image (not on the words so far). Decoding keeps them at
    #: one row per image, (B, ...), while the other entries have a row per beam, (B * k, ...): never
    #: copied per beam, and left in place when beams are reordered (rows only move within an image).
    image_constant_keys: tuple[str, ...] = ()
    #: Child modules (Linear, LSTM, LSTMCell) run at every step, not once per image: what int8
    #: decoding computes in int8 (see :mod:`captioner.models.int8_compute`).
    step_matrices: tuple[str, ...] = ()

    def init_state(self, features: torch.Tensor) -> DecoderState:
        """Features (B, P, D) -> the state before the first word (one row per image)."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: DecoderState, attention: bool = True) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        """Feed one word per row: tokens (R,) -> logits (R, V), next state, attention (R, P) or None.

        R = B * k rows for the B rows of the ``image_constant_keys`` entries (k = 1 when they were
        expanded like the rest). ``attention=False``: the caller will not read the attention, so a
        decoder that must assemble it (an ensemble averages its members') may return None."""
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, sampling_probability: float = 0.0, hard_attention: str | None = None
    ) -> DecoderOutput:
        """Teacher forcing.

        features (N, P, D), one row per image; captions (N * k, T) as <start> w1 .. wn <end> <pad>..,
        the k captions of image i in rows i*k .. (i+1)*k-1 (k comes from the shapes, see
        :func:`captions_per_image`); lengths (N * k,) counting <start> and <end>. Returns
        :class:`DecoderOutput`: logits (B, T-1, V) predicting captions[:, 1:], attention (B, T-1, P)
        for attention decoders. Positions past a caption's end are zero and were never computed.

        ``sampling_probability`` > 0 is scheduled sampling (Bengio et al. 2015): each input word after
        the first is, with that probability, a word sampled from the decoder's own prediction at the
        step before instead of the reference word. ``hard_attention`` ("sample" or "expected", see
        ``HARD_TRAINING``) tells a hard-attention decoder how to read the image in this batch; None
        reads it as decoding does. Other decoders ignore it.
        """
        raise NotImplementedError

    def word_output(self, in_features: int) -> None:
        """The output layer over the vocabulary, from ``in_features``-wide inputs: ``classifier`` (a
        Linear to the V words; with GloVe word space, to the 50 dimensions of the vectors, plus one
        bias per word in ``word_bias``). :meth:`word_logits` applies it."""
        if self.config.word_space == "learned":
            self.classifier = nn.Linear(in_features, self.vocab_size)
            nn.init.zeros_(self.classifier.bias)
            nn.init.uniform_(self.classifier.weight, -0.1, 0.1)
        else:
            self.classifier = nn.Linear(in_features, self.config.embed_dim, bias=False)
            self.word_bias = nn.Parameter(torch.zeros(self.vocab_size))

    def word_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> logits (..., V); in GloVe word space g_w . U x + b_w, the fixed
        vectors being the embedding's rows."""
        if self.config.word_space == "learned":
            return self.classifier(x)
        return F.linear(self.classifier(x), self.embedding.weight, self.word_bias)

    def extend_vocabulary(self, analogs: list[int], vectors: torch.Tensor | None = None) -> None:
        """Grow the vocabulary by one word per entry of ``analogs`` (a known word's index each).
        Learned word space: the new word's embedding and output row (weights and bias) are copies of
        its analog's. GloVe word space: its embedding, and so its output row, is its own vector
        (``vectors``, (n, 50)); its bias is its analog's."""
        index = torch.tensor(analogs, dtype=torch.long, device=self.embedding.weight.device)
        learned = self.config.word_space == "learned"
        if not learned and (vectors is None or tuple(vectors.shape) != (len(analogs), self.embedding.weight.shape[1])):
            raise ConfigError(f"adding words to a decoder in {self.config.word_space} word space needs their vectors, one {self.embedding.weight.shape[1]}-d row per word")
        with torch.no_grad():
            rows = self.embedding.weight[index] if learned else vectors.to(self.embedding.weight)  # type: ignore[union-attr]
            embedding = torch.cat([self.embedding.weight, rows])  # (V + n, E)
            self.embedding = nn.Embedding(embedding.shape[0], embedding.shape[1], padding_idx=0, _weight=embedding)
            self.embedding.weight.requires_grad_(not self.config.fixed_embedding)
            if learned:
                old = self.classifier
                self.classifier = nn.Linear(old.in_features, old.out_features + len(analogs)).to(old.weight.device)
                self.classifier.weight.copy_(torch.cat([old.weight, old.weight[index]]))
                self.classifier.bias.copy_(torch.cat([old.bias, old.bias[index]]))
            else:
                self.word_bias = nn.Parameter(torch.cat([self.word_bias, self.word_bias[index]]))
        self.vocab_size += len(analogs)

    @staticmethod
    def scheduled_inputs(tokens: torch.Tensor, previous_logits: torch.Tensor, probability: float) -> torch.Tensor:
        """Reference words (B,), each replaced with ``probability`` by a sample from the previous step's
        prediction (B, V) (no gradient flows through the choice)."""
        use_sample = torch.rand(tokens.shape[0], device=tokens.device) < probability
        sampled = torch.multinomial(torch.softmax(previous_logits.detach().float(), dim=-1), 1).squeeze(1)
        return torch.where(use_sample, sampled, tokens)

    def load_embeddings(self, vectors: torch.Tensor, found: torch.Tensor) -> None:
        """Copy pretrained word vectors (V, E) into the embedding rows marked in ``found`` (V,)."""
        embedding: nn.Embedding = self.embedding  # type: ignore[assignment]
        if vectors.shape != embedding.weight.shape:
            raise ConfigError(f"word vectors have shape {tuple(vectors.shape)}, the embedding needs {tuple(embedding.weight.shape)}")
        with torch.no_grad():
            embedding.weight[found] = vectors[found].to(embedding.weight.dtype)
        embedding.weight.requires_grad_(not self.config.fixed_embedding)


def word_embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """The word embedding every decoder starts from: uniform in [-0.1, 0.1] (as sgrvinod's tutorial),
    drawn once (building it on the meta device, to check a checkpoint's shapes, then costs nothing)."""
    return nn.Embedding(vocab_size, dim, padding_idx=0, _weight=torch.empty(vocab_size, dim).uniform_(-0.1, 0.1))


def select_state(state: DecoderState, index: torch.Tensor, *, keep: tuple[str, ...] = ()) -> DecoderState:
    """Rows ``index`` of every tensor in the state (beam reordering, or expanding images to beams).

    Entries named in ``keep`` are returned as they are: pass a decoder's ``image_constant_keys``
    when ``index`` only permutes rows among the beams of each image.
    """
    return {key: value if key in keep else take_rows(value, index) for key, value in state.items()}


def take_rows(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``value`` along its first axis. Copied through a 2-D view: PyTorch's CPU
    ``index_select`` copies whole rows of a matrix several times faster than those of a tensor with
    more axes (a batch's features (B, V, P, D): 5x)."""
    if value.dim() <= 2:
        return value.index_select(0, index)
    return value.reshape(value.shape[0], -1).index_select(0, index).view(index.shape[0], *value.shape[1:])


def captions_per_image(features: torch.Tensor, captions: torch.Tensor) -> int:
    """How many captions each image brings, from the shapes: captions (N * k, T) for features (N, P, D)."""
    return rows_per_image(captions.shape[0], features.shape[0])


def rows_per_image(rows: int, images: int) -> int:
    """k where ``rows`` = images * k, rows i*k .. (i+1)*k-1 on image i (its captions, beams or
    samples), derived from the shapes as ruotianluo's AttModel derives seq_per_img."""
    if images == 0 or rows % images:
        raise ConfigError(f"{rows} rows cannot be shared evenly by {images} images")
    return rows // images


def repeat_state(state: DecoderState, times: int) -> DecoderState:
    """Each row repeated ``times`` times in place: (N, ...) -> (N * times, ...)."""
    if times == 1:
        return state
    return {key: value.repeat_interleave(times, dim=0) for key, value in state.items()}


def sort_by_length(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): ``order`` sorts rows by decreasing length; ``inverse`` undoes it."""
    order = torch.argsort(lengths, descending=True, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return order, inverse
