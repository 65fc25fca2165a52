"""Soft (additive / MLP) attention over image regions, as in Show, Attend and Tell (Xu et al. 2015)."""

from __future__ import annotations

import torch
from torch import nn


class SoftAttention(nn.Module):
    """e_p = w . tanh(W_f f_p + W_h h); alpha = softmax(e) over the P regions; context = sum_p alpha_p f_p.

    The feature projection ``W_f f`` does not depend on the step: :meth:`project` computes it once
    per image and every step reuses it.
    """

    step_matrices = ("hidden_proj",)  # run at every word (int8 decoding computes these in int8)

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, P, D) -> (B, P, A)

    def forward(self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, P, D), projected (B, P, A), hidden (B, H) -> context (B, D), alpha (B, P)."""
        energy = self.score(torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = torch.softmax(energy, dim=1)  # (B, P), sums to 1 over regions
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
        return context, alpha
