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

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from captioner.errors import ConfigError
from captioner.models.decoder import Decoder, DecoderConfig, DecoderState

VIEWS = ("plain", "flip")


@dataclass
class EnsembleConfig:
    decoders: list[DecoderConfig] = field(default_factory=list)
    views: tuple[str, ...] = ("plain",)

    def __post_init__(self) -> None:
        self.views = tuple(self.views)
        if not self.decoders:
            raise ConfigError("an ensemble needs at least one decoder")
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
    """Every decoder on every view; the members' distributions averaged at each step."""

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
        self.pairs = [(d, v) for d in range(len(decoders)) for v in range(len(self.views))]  # (decoder, view)
        self.image_constant_keys = tuple(f"{d}.{v}.{key}" for d, v in self.pairs for key in decoders[d].image_constant_keys)

    def extend_vocabulary(self, analogs: list[int]) -> None:
        for member in self.members:
            member.extend_vocabulary(analogs)
        self.vocab_size += len(analogs)

    def _view(self, features: torch.Tensor, view: int) -> torch.Tensor:
        """The regions of one view: features (B, V*P, D) -> (B, P, D)."""
        if features.shape[1] % len(self.views):
            raise ConfigError(f"an ensemble of {len(self.views)} views needs features with a multiple of {len(self.views)} regions, not {features.shape[1]}")
        regions = features.shape[1] // len(self.views)
        return features[:, view * regions : (view + 1) * regions]

    def _as_seen(self, attention: torch.Tensor, view: int) -> torch.Tensor:
        return mirror(attention) if self.views[view] == "flip" else attention

    def init_state(self, features: torch.Tensor) -> DecoderState:
        state: DecoderState = {}
        for d, v in self.pairs:
            state.update({f"{d}.{v}.{key}": value for key, value in self.members[d].init_state(self._view(features, v)).items()})
        return state

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState, torch.Tensor | None]:
        log_probs, attentions, next_state = [], [], {}
        for d, v in self.pairs:
            prefix = f"{d}.{v}."
            own = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
            logits, own, alpha = self.members[d].step(tokens, own)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))  # (B, V)
            if alpha is not None:
                attentions.append(self._as_seen(alpha, v))  # (B, P)
            next_state.update({prefix + key: value for key, value in own.items()})
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))  # (B, V) log of the mean probability
        return mean, next_state, torch.stack(attentions).mean(dim=0) if self.has_attention else None

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, sampling_probability: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_probs, attentions = [], []
        for d, v in self.pairs:
            logits, alphas = self.members[d](self._view(features, v), captions, lengths, sampling_probability)
            log_probs.append(torch.log_softmax(logits.float(), dim=-1))  # (B, T-1, V)
            if alphas is not None:
                attentions.append(self._as_seen(alphas, v))  # (B, T-1, P)
        mean = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
        return mean, torch.stack(attentions).mean(dim=0) if self.has_attention else None
