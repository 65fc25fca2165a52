"""Training hard (stochastic) attention: Xu et al. 2015, section 4.1.

Each step's context is the feature at one region s_t sampled from the attention weights alpha_t, so
the word log-likelihood log p(y | s, a) is not differentiable in the choice. The paper maximises a
variational lower bound on log p(y | a), E_s[log p(y | s, a)], whose gradient is estimated from one
sample per caption as

    d log p(y | s~, a)  +  lambda_r (log p(y | s~, a) - b) d log p(s~ | a)  +  lambda_e d H[alpha]

(the paper's eq. 12): the words' gradient through the sampled regions, REINFORCE for the regions
(lambda_r = 1 is the exact gradient of the bound; smaller trades bias for variance), with b a moving
average of log p(y | s~, a) (b <- 0.9 b + 0.1 log p), and an entropy bonus on the weights. With
probability ``hard_attention_expected`` a batch reads the expected feature instead (soft attention:
"in order to further improve the robustness of this learning rule"), as the authors' code does per
batch. lambda_r = 0.1 and lambda_e = 0.002 are the values in the authors' code (Theano,
kelvinxu/arctic-captions), which scaled a per-word reward; here the reward is the caption's, as in
the paper's equation.

Everything is divided by the batch's word count, as the cross-entropy is (a mean over words).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from captioner.training.distributed import Distributed


def batch_reading(expected_probability: float) -> str:
    """How this batch's captions read the image: "expected" with the given probability, else "sample"
    (drawn from torch's random stream, so a resumed run draws the same)."""
    return "expected" if float(torch.rand(())) < expected_probability else "sample"


def caption_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y | s~, a) of each caption, without gradient: logits (B, T, V), targets and mask (B, T) -> (B,)."""
    with torch.no_grad():
        word_log_probs = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")  # (words,)
        rows = mask.nonzero()[:, 0]  # the caption of each word, in the same (row-major) order
        return torch.zeros(mask.shape[0], device=logits.device).index_add_(0, rows, word_log_probs)


def reinforce_term(
    attention: torch.Tensor,
    locations: torch.Tensor,
    log_likelihood: torch.Tensor,
    baseline: float,
    *,
    reinforce_weight: float,
    entropy_weight: float,
    words: int,
) -> torch.Tensor:
    """The part of the loss whose gradient is the regions' REINFORCE estimate and the entropy bonus.

    attention (B, T, P) the weights each step sampled from; locations (B, T) the regions sampled, -1
    past each caption's end; log_likelihood (B,) each caption's log p(y | s~, a) (no gradient).
    Returns -(lambda_r sum_n (log p_n - b) log p(s~_n) + lambda_e sum_{n,t} H[alpha_nt]) / words.
    """
    steps = locations >= 0  # (B, T)
    weights = attention.float().clamp_min(1e-12)
    chosen = weights.gather(2, locations.clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, T) alpha at the sampled region
    region_log_prob = (torch.log(chosen) * steps).sum(dim=1)  # (B,) log p(s~ | a)
    advantage = (log_likelihood - baseline).detach()  # (B,)
    entropy = (-(weights * torch.log(weights)).sum(dim=2) * steps).sum()  # summed over every real step
    return -(reinforce_weight * (advantage * region_log_prob).sum() + entropy_weight * entropy) / max(words, 1)


def next_baseline(baseline: float | None, log_likelihood_sum: torch.Tensor, captions: torch.Tensor, decay: float, dist_info: Distributed) -> float | None:
    """The moving-average baseline after one step: every rank's sampled captions pooled (a
    collective: every rank calls it at every step of a hard-attention run, sampled or not).
    ``log_likelihood_sum`` and ``captions`` are this rank's (0 for a batch that did not sample)."""
    totals = dist_info.all_reduce_sum(torch.stack([log_likelihood_sum.detach().float(), captions.detach().float()]))
    if float(totals[1]) == 0:
        return baseline
    mean = float(totals[0] / totals[1])
    return mean if baseline is None else decay * baseline + (1 - decay) * mean
