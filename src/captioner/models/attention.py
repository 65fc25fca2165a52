"""Attention over image regions, as in Show, Attend and Tell (Xu et al. 2015): additive (MLP) weights,
read as their expected feature (soft attention) or as the feature at one region (hard attention)."""

from __future__ import annotations

import torch
from torch import nn

from captioner.models.decoder import rows_per_image

#: The (B, n, P, A) grid is summed and squashed an image (or a few) at a time, in pieces of about
#: this many floats (1 MiB): a piece stays in the cache and its memory is reused, where the whole grid
#: at batch 32 (64 MB) was a fresh allocation at every step, 2.6x the time of the pieces.
CHUNK_ELEMENTS = 2**18


class SoftAttention(nn.Module):
    """e_p = w . tanh(W_f f_p + W_h h); alpha = softmax(e) over the P regions; context = sum_p alpha_p f_p.

    The feature projection ``W_f f`` does not depend on the step: :meth:`project` computes it once
    per image and every step reuses it. Several hidden states may look at one image (the beams of a
    beam search): hidden (B * n, H) against features (B, P, D), rows i*n .. (i+1)*n-1 on image i, n
    derived from the shapes, so the image's features are neither copied per beam nor read once per
    beam.

    The P x A tanh is most of a decoding step's arithmetic; it is computed as a sigmoid, the same
    function (tanh z = 2 sigmoid(2z) - 1, so w . tanh z + b = 2w . sigmoid(2z) + b - sum(w)) at a
    quarter of the time at batch 1 and half at batch 32 on a CPU; :meth:`project` gives 2 W_f f.
    """

    step_matrices = ("hidden_proj",)  # run at every word (int8 decoding computes these in int8)

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, P, D) -> 2 W_f f (B, P, A), what :meth:`forward` takes as ``projected``."""
        return self.feature_proj(features) * 2

    def forward(self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, P, D), projected (B, P, A), hidden (B * n, H) -> context (B * n, D), alpha (B * n, P)."""
        alpha = self.weights(projected, hidden)
        return self.read(features, alpha), alpha

    def weights(self, projected: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """projected (B, P, A), hidden (B * n, H) -> alpha (B * n, P), each row summing to 1 over the regions."""
        images, regions = projected.shape[:2]
        looks = rows_per_image(hidden.shape[0], images)
        query = (self.hidden_proj(hidden) * 2).view(images, looks, 1, -1)  # (B, n, 1, A)
        weight, offset = self.score.weight[0] * 2, self.score.bias - self.score.weight.sum()
        per_chunk = max(1, CHUNK_ELEMENTS // projected[0].numel() // looks)  # images per piece of the (B, n, P, A) grid
        energy = torch.cat([
            torch.matmul(torch.sigmoid_(projected[start : start + per_chunk].unsqueeze(1) + query[start : start + per_chunk]), weight)  # sigmoid(2z) = (1 + tanh z) / 2
            for start in range(0, images, per_chunk)
        ]) + offset  # (B, n, P)
        return torch.softmax(energy.view(-1, regions), dim=1)  # (B * n, P), sums to 1 over regions

    @staticmethod
    def read(features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """The expected feature under alpha: features (B, P, D), alpha (B * n, P) -> context (B * n, D)."""
        images, regions = features.shape[:2]
        return torch.bmm(alpha.view(images, -1, regions), features).view(alpha.shape[0], -1)

    @staticmethod
    def read_at(features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """Hard attention's context: the feature at one region per row. features (B, P, D),
        locations (B * n,) region indices -> (B * n, D)."""
        looks = rows_per_image(locations.shape[0], features.shape[0])
        images = torch.arange(locations.shape[0], device=locations.device) // looks
        return features[images, locations]
