"""Self-critical sequence training (Rennie et al. 2017), with the mean-of-other-samples baseline.

Cross-entropy training teaches the decoder to predict the next reference word given the previous
*reference* words; at test time it conditions on its *own* words and is scored by CIDEr-D. SCST
optimises what is measured: for each image the decoder samples ``k`` captions, each is rewarded with
its CIDEr-D against the image's references, and REINFORCE raises the log-probability of samples that
beat the baseline and lowers the others'. The baseline of a sample is the mean reward of the image's
other ``k - 1`` samples (Luo 2020, "A better variant of self-critical sequence training"), which needs
no extra greedy decode and works better than the greedy baseline of the original paper.

The reward's document frequencies come from the training references (:class:`~captioner.metrics.cider.CiderD`),
tokenised by our vocabulary, so rewards are computed on word ids in a few milliseconds per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from captioner.data.vocabulary import Vocabulary
from captioner.decoding.generate import block_doubled_words, ends_badly
from captioner.metrics.cider import CiderD
from captioner.models.decoder import Decoder, repeat_state, select_state

if TYPE_CHECKING:
    from captioner.data.prepare import PreparedDataset


class CaptionRewards:
    """CIDEr-D rewards of word-id captions against each training image's references."""

    def __init__(self, references: Sequence[Sequence[Sequence[int]]]) -> None:
        """``references[position]``: the word ids (no <start>/<end>) of the references of the image
        at that position of the split (the order of the feature cache)."""
        self.scorer = CiderD(references)
        self._vectors = [self.scorer.reference_vectors(refs) for refs in references]

    @classmethod
    def from_encoded(cls, tokens: np.ndarray, lengths: np.ndarray, image_positions: np.ndarray, images: int, vocab: Vocabulary) -> CaptionRewards:
        """From a prepared split's encoded captions: tokens (N, L) <start> w.. <end>, lengths, image positions."""
        references: list[list[list[int]]] = [[] for _ in range(images)]
        for row, length, position in zip(tokens, lengths.tolist(), image_positions.tolist()):
            references[position].append([int(t) for t in row[1 : length - 1]])
        return cls(references)

    @classmethod
    def for_split(cls, dataset: PreparedDataset, split: str) -> CaptionRewards:
        """Rewards against the references of a prepared split, its images in split order (as its feature cache)."""
        captions = dataset.captions(split)
        positions = {index: position for position, index in enumerate(dataset.split_images(split))}
        image_positions = np.array([positions[int(i)] for i in captions["image_index"]], dtype=np.int64)
        return cls.from_encoded(captions["tokens"], captions["lengths"], image_positions, len(positions), dataset.vocab)

    def __call__(self, positions: Sequence[int], captions: list[list[int]], per_image: int) -> torch.Tensor:
        """Rewards (len(captions),) of ``per_image`` captions for each image of ``positions``, in order."""
        rewards = [self.scorer.score(caption, self._vectors[positions[i // per_image]]) for i, caption in enumerate(captions)]
        return torch.tensor(rewards, dtype=torch.float32)


class SentenceRules:
    """What self-critical sampling may not write, as decoding may not (``block_bad_endings``,
    ``block_doubled_words``, through the same functions): otherwise the policy learns the endings that decoding refuses."""

    def __init__(self, vocab: Vocabulary, *, bad_endings: bool, doubled_words: bool) -> None:
        self.vocab, self.bad_endings, self.doubled_words = vocab, bad_endings and bool(vocab.bad_endings), doubled_words

    def __bool__(self) -> bool:
        return self.bad_endings or self.doubled_words

    def apply(self, logits: torch.Tensor, histories: list[list[int]], previous: torch.Tensor) -> torch.Tensor:
        """logits (rows, V) with -inf (in place) where the rules forbid the next word; ``previous`` (rows,) the word before."""
        if self.bad_endings:
            logits[ends_badly(self.vocab, [words[-4:] for words in histories]), self.vocab.end_id] = -torch.inf
        if self.doubled_words:
            before = torch.tensor([words[-2] for words in histories], device=previous.device) if histories and len(histories[0]) > 1 else None
            block_doubled_words(self.vocab, logits, previous, before)
        return logits


class NonFiniteLogits(Exception):
    """The decoder produced NaN or infinite scores while sampling."""


def sample_with_log_probs(
    decoder: Decoder,
    features: torch.Tensor,
    samples: int,
    max_length: int,
    start_id: int,
    end_id: int,
    blocked: Sequence[int],
    rules: SentenceRules | None = None,
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Sample ``samples`` captions per image, keeping the graph of their log-probabilities.

    The ``blocked`` words are never sampled, nor what ``rules`` forbid (<end> after a bad ending, a
    word twice in a row), and log-probabilities are those of the distribution renormalised without
    them (the policy that is actually sampled from).
    features (B, P, D) -> (captions as word-id lists without <end>, log-probabilities (B*k, T) of every
    sampled token <end> included, mask (B*k, T) of the real ones). Rows stop being computed once they
    have sampled <end>; captions that never do stop at ``max_length`` words.
    """
    state = repeat_state(decoder.init_state(features), samples)  # (B*k, ...), image work done once
    blocked_ids = torch.tensor(sorted(set(blocked)), dtype=torch.long, device=features.device)
    rows = features.shape[0] * samples
    alive = torch.arange(rows, device=features.device)  # rows still writing
    tokens = torch.full((rows,), start_id, dtype=torch.long, device=features.device)
    words: list[list[int]] = [[] for _ in range(rows)]
    step_log_probs: list[torch.Tensor] = []
    step_rows: list[torch.Tensor] = []
    for t in range(max_length + 1):
        logits, state, _ = decoder.step(tokens, state, attention=False)  # (alive, V)
        if not bool(torch.isfinite(logits.detach()).all()):
            raise NonFiniteLogits  # nothing to sample from; the training loop applies its nan_policy
        # The policy is the model's distribution over the words that may be written (<pad>, <start> and
        # <unk> never are): its log-probabilities, renormalised without them, are what REINFORCE needs.
        masked = logits.float().index_fill(1, blocked_ids, -torch.inf)  # (alive, V)
        if rules and t > 0:
            masked = rules.apply(masked, [words[row] for row in alive.tolist()], tokens)
        log_probs = torch.log_softmax(masked, dim=-1)  # (alive, V)
        if t == max_length:
            chosen = torch.full_like(tokens, end_id)  # out of room: the caption ends here (not scored)
        else:
            chosen = torch.multinomial(log_probs.detach().exp(), 1).squeeze(1)  # (alive,)
        if t < max_length:
            step_log_probs.append(log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1))
            step_rows.append(alive)
        ending = chosen == end_id
        for row, word in zip(alive[~ending].tolist(), chosen[~ending].tolist()):
            words[row].append(word)
        keep = (~ending).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        alive, tokens = alive[keep], chosen[keep]
        state = select_state(state, keep)
    # Lay the per-step values of the rows alive at each step out as (B*k, T) grids, zeros elsewhere.
    log_prob_grid = torch.stack([features.new_zeros(rows).index_put((where,), values) for values, where in zip(step_log_probs, step_rows)], dim=1)
    mask = torch.stack([torch.zeros(rows, dtype=torch.bool, device=features.device).index_fill(0, where, True) for where in step_rows], dim=1)
    return words, log_prob_grid, mask


def self_critical_loss(
    decoder: Decoder,
    features: torch.Tensor,
    positions: Sequence[int],
    rewards: CaptionRewards,
    vocab: Vocabulary,
    *,
    samples: int,
    max_length: int,
    rules: SentenceRules | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean reward) for a batch of images (features (B, P, D), their split positions)."""
    if samples < 2:
        raise ValueError("self-critical training needs at least 2 samples per image (the baseline is the others' mean)")
    blocked = [vocab.pad_id, vocab.start_id, vocab.unk_id]
    try:
        captions, log_probs, mask = sample_with_log_probs(decoder, features, samples, max_length, vocab.start_id, vocab.end_id, blocked, rules)
    except NonFiniteLogits:
        nan = features.new_full((), float("nan"))
        return nan, nan
    reward = rewards(positions, captions, samples).to(features.device)  # (B*k,)
    grouped = reward.view(-1, samples)  # (B, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (samples - 1)  # (B, k): mean of the others
    advantage = (grouped - baseline).view(-1, 1)  # (B*k, 1)
    loss = -(advantage * log_probs * mask).sum() / mask.sum().clamp(min=1)
    return loss, reward.mean()
