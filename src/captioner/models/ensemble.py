"""Ensembles: several decoders and several views of the image, decoding as one model.

At every step an ensemble averages the word distributions of its members (the mean of their
probabilities, whose log is what decoding sees), as Vinyals et al. 2015 did for Show and Tell's best
results. A member is one decoder applied to one *view* of the image: the picture as it is
(``"plain"``) or mirrored left to right (``"flip"``, test-time augmentation: better captions for no
extra weights). Every decoder sees every view. The encoder runs once per view and the views'
features arrive side by side along the region axis, (B, V * P, D). Attention maps are averaged over
the members, a flipped view's maps mirrored back first, so they point at the picture as it is.

Members share the encoder (its features are computed once per view), the vocabulary and the kind of
decoder; their sizes may differ.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.limits import MAX_ENSEMBLE_DECODERS
from captioner.models.decoder import Decoder, DecoderConfig, DecoderOutput, DecoderState, rows_per_image

VIEWS = ("plain", "flip")


@dataclass
class EnsembleConfig:
    decoders: list[DecoderConfig] = field(default_factory=list)
    views: tuple[str, ...] = ("plain",)

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        if not self.decoders:
            raise ConfigError("an ensemble needs at least one decoder")
        if len(self.decoders) > MAX_ENSEMBLE_DECODERS:
            raise ConfigError(f"an ensemble has at most {MAX_ENSEMBLE_DECODERS} decoders, not {len(self.decoders)}")
        if not self.views or len(set(self.views)) != len(self.views) or not set(self.views) <= set(VIEWS):
            raise ConfigError(f"ensemble views must be distinct, from {', '.join(VIEWS)}, not {list(self.views)}")
        if len(self.decoders) == 1 and self.views == ("plain",):
            raise ConfigError("an ensemble needs two decoders or a second view (flip)")
        kinds = {config.kind for config in self.decoders}
        if len(kinds) > 1:
            raise ConfigError(f"an ensemble's decoders must be of one kind, not {', '.join(sorted(kinds))}")

    def to_dict(self) -> dict[str, Any]:
        return {"decoders": [config.to_dict() for config in self.decoders], "views": list(self.views)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EnsembleConfig:
        if not isinstance(values, dict) or not isinstance(values.get("decoders"), list) or not isinstance(values.get("views", []), list):
            raise ConfigError("an ensemble config needs a list of 'decoders' and a list of 'views'")
        if not all(isinstance(config, dict) for config in values["decoders"]):
            raise ConfigError("each of an ensemble's decoders must be an object")
        return cls([DecoderConfig.from_dict(config) for config in values["decoders"]], tuple(values.get("views", ["plain"])))


def mirror(attention: torch.Tensor) -> torch.Tensor:
    """Attention over a square grid of regions (..., P), mirrored left to right."""
    regions = attention.shape[-1]
    side = math.isqrt(regions)
    if side * side != regions:
        raise ConfigError(f"a flipped view needs a square feature grid, not {regions} regions")
    return attention.reshape(*attention.shape[:-1], side, side).flip(-1).reshape(attention.shape)


class EnsembleDecoder(Decoder):
    """Every decoder on every view; the members' distributions averaged at each step.

    Each decoder runs once per step for all views: its state holds the views side by side, (R, V, ...)
    (one row per beam, so beam search moves them together; (B, V, ...) for its per-image entries),
    given to the decoder as B * V images with their k = R / B beams each.
    One call over twice the rows reads the decoder's weights once, where one call per view read them
    twice: at batch 1, reading weights is most of a step's time.
    """

    def __init__(self, decoders: Sequence[Decoder], views: Sequence[str]) -> None:
        super().__init__()
        first = decoders[0]
        for decoder in decoders:
            if (decoder.vocab_size, decoder.feature_dim) != (first.vocab_size, first.feature_dim):
                raise ConfigError("an ensemble's decoders must share the vocabulary and the feature size")
        self.members = nn.ModuleList(decoders)
        self.views = tuple(views)
        self.config, self.vocab_size, self.feature_dim = first.config, first.vocab_size, first.feature_dim
        self.has_attention = all(decoder.has_attention for decoder in decoders)
        self.image_constant_keys = tuple(f"{d}.{key}" for d, decoder in enumerate(decoders) for key in decoder.image_constant_keys)

    def extend_vocabulary(self, analogs: list[int], vectors: torch.Tensor | None = None) -> None:
        for member in self.members:
            member.extend_vocabulary(analogs, vectors)
        self.vocab_size += len(analogs)

    def _view(self, features: torch.Tensor, view: int) -> torch.Tensor:
        """The regions of one view: features (B, V*P, D) -> (B, P, D)."""
        return self._by_view(features)[:, view]

    def _by_view(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, V*P, D) -> (B, V, P, D)."""
        if features.shape[1] % len(self.views):
            raise ConfigError(f"an ensemble of {len(self.views)} views needs features with a multiple of {len(self.views)} regions, not {features.shape[1]}")
        return features.reshape(features.shape[0], len(self.views), features.shape[1] // len(self.views), *features.shape[2:])

    def _as_seen(self, attention: torch.Tensor, view: int) -> torch.Tensor:
        return mirror(attention) if self.views[view] == "flip" else attention

    def _seen_mean(self, attention: torch.Tensor) -> torch.Tensor:
        """Attention (..., V, P) per view -> (..., P): flipped views mirrored back, then averaged."""
        return torch.stack([self._as_seen(attention[..., v, :], v) for v in range(len(self.views))]).mean(dim=0)

    def init_state(self, features: torch.Tensor) -> DecoderState:
        batch, views = features.shape[0], len(self.views)
        by_view = self._by_view(features).flatten(0, 1)  # (B * V, P, D), the views of an image side by side
        state: DecoderState = {}
        for d, member in enumerate(self.members):
            state.update({f"{d}.{key}": value.reshape(batch, views, *value.shape[1:]) for key, value in member.init_state(by_view).items()})
        return state

    def step(self, tokens: torch.Tensor, state: DecoderState, attention: bool = True) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        rows, views = tokens.shape[0], len(self.views)
        images = next((state[key].shape[0] for key in self.image_constant_keys if key in state), rows)
        beams = rows_per_image(rows, images)  # state (R, V, ...) per beam, (B, V, ...) per image; R = B * k

        def to_member(value: torch.Tensor, per_image: bool) -> torch.Tensor:
            """(B, V, ...) -> (B*V, ...); (R, V, ...) -> (B*V*k, ...): each (image, view)'s k beams together."""
            if per_image:
                return value.flatten(0, 1)
            return value.view(images, beams, views, *value.shape[2:]).transpose(1, 2).flatten(0, 2)

        def from_member(value: torch.Tensor, per_image: bool) -> torch.Tensor:
            if per_image:
                return value.view(images, views, *value.shape[1:])
            return value.view(images, views, beams, *value.shape[1:]).transpose(1, 2).reshape(rows, views, *value.shape[1:])

        log_probs, attentions, next_state = [], [], {}
        every_view = tokens.view(images, 1, beams).expand(images, views, beams).reshape(-1)  # (B*V*k,)
        for d, member in enumerate(self.members):
            prefix = f"{d}."
            own = {key[len(prefix) :]: to_member(value, key in self.image_constant_keys) for key, value in state.items() if key.startswith(prefix)}
            logits, own, alpha = member.step(every_view, own, attention)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1).view(images, views, beams, -1))  # (B, V, k, vocab), as the member's rows are
            if attention and alpha is not None:
                attentions.append(self._seen_mean(from_member(alpha, False)))  # (R, P)
            next_state.update({prefix + key: from_member(value, prefix + key in self.image_constant_keys) for key, value in own.items()})
        members = torch.stack(log_probs, dim=1).flatten(1, 2)  # (B, M * V, k, vocab)
        mean = torch.logsumexp(members, dim=1).view(rows, -1) - math.log(members.shape[1])  # (R, vocab) log of the mean probability
        return mean, next_state, torch.stack(attentions).mean(dim=0) if attentions else None

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, sampling_probability: float = 0.0, hard_attention: str | None = None
    ) -> DecoderOutput:
        """The members' mean word distribution as log probabilities (B, T-1, V), each reading the
        image as it decodes (an ensemble is decoded, not trained)."""
        log_probs, attentions = [], []
        for d, v in itertools.product(range(len(self.members)), range(len(self.views))):
            logits, alphas, _ = self.members[d](self._view(features, v), captions, lengths, sampling_probability)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))  # (B, T-1, V)
            if alphas is not None:
                attentions.append(self._as_seen(alphas, v))  # (B, T-1, P)
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return DecoderOutput(mean, torch.stack(attentions).mean(dim=0) if self.has_attention else None)
