"""Batches of images, each with ``seq_per_img`` of its captions, in an order fixed by (seed, epoch).

The order of an epoch depends only on the seed and the epoch number, never on what ran before, so
an interrupted run that resumes mid-epoch sees exactly the batches it would have seen. Under DDP each
rank takes every world_size-th batch of the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from captioner.data.prepare import PreparedDataset


@dataclass
class Batch:
    positions: list[int]  # images, as positions in the split's image list (and its feature cache)
    captions: torch.Tensor  # (N * seq_per_img, T) <start> .. <end> <pad>..
    lengths: torch.Tensor  # (N * seq_per_img,)


class CaptionBatches:
    """Plans epochs over the images of one split that have at least one trainable caption."""

    def __init__(
        self,
        image_positions: dict[int, int],
        tokens: np.ndarray,
        lengths: np.ndarray,
        image_index: np.ndarray,
        *,
        batch_size: int,
        seq_per_img: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``image_positions`` maps a global image index to its position in the split; ``tokens``,
        ``lengths`` and ``image_index`` are the split's encoded captions (see PreparedDataset)."""
        self.tokens, self.lengths = tokens, lengths
        self.batch_size, self.seq_per_img, self.seed = batch_size, seq_per_img, seed
        self.rank, self.world_size = rank, world_size
        rows_of: dict[int, list[int]] = {}
        for row, image in enumerate(image_index.tolist()):
            rows_of.setdefault(int(image), []).append(row)
        self.images = sorted(rows_of)  # global indices of images that have captions to learn from
        self.rows_of = rows_of
        self.position_of = image_positions

    @classmethod
    def for_split(cls, dataset: "PreparedDataset", split: str, *, batch_size: int, seq_per_img: int, seed: int, rank: int = 0, world_size: int = 1) -> "CaptionBatches":
        """The plan of one split of a prepared dataset (positions are the split's image order, as in its feature cache)."""
        captions = dataset.captions(split)
        positions = {index: position for position, index in enumerate(dataset.split_images(split))}
        return cls(
            positions, captions["tokens"], captions["lengths"], captions["image_index"],
            batch_size=batch_size, seq_per_img=seq_per_img, seed=seed, rank=rank, world_size=world_size,
        )

    def __len__(self) -> int:
        """Batches per epoch for one rank."""
        total = -(-len(self.images) // self.batch_size)
        return total // self.world_size if self.world_size > 1 else total

    def epoch(self, epoch: int, *, skip: int = 0) -> list[Batch]:
        """The batches of ``epoch`` for this rank, after skipping the first ``skip`` of them."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.images))
        chosen_rows = []
        for i in order.tolist():
            rows = self.rows_of[self.images[i]]
            if len(rows) >= self.seq_per_img:
                picked = rng.choice(rows, size=self.seq_per_img, replace=False)
            else:  # too few captions: all of them, topped up with repeats
                picked = np.concatenate([rows, rng.choice(rows, size=self.seq_per_img - len(rows), replace=True)])
            chosen_rows.append(picked)
        plans = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        row_plans = [chosen_rows[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.world_size > 1:
            usable = len(plans) // self.world_size * self.world_size  # every rank runs the same number of steps
            plans, row_plans = plans[:usable][self.rank :: self.world_size], row_plans[:usable][self.rank :: self.world_size]
        batches = []
        for plan, rows in list(zip(plans, row_plans))[skip:]:
            flat_rows = np.concatenate(rows)
            lengths = self.lengths[flat_rows]
            width = int(lengths.max())
            batches.append(
                Batch(
                    positions=[self.position_of[self.images[i]] for i in plan.tolist()],
                    captions=torch.from_numpy(self.tokens[flat_rows, :width].astype(np.int64)),
                    lengths=torch.from_numpy(lengths.astype(np.int64)),
                )
            )
        return batches
