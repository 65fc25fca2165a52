"""What a training run reads: its prepared dataset, the batch plans of both splits, and their inputs.

While the encoder is frozen (the installed pretrained weights), every step reads cached features
(N, P, D) from disk (:mod:`captioner.data.features`); once fine-tuning trains the encoder, steps
decode images (N, 3, S, S) in loader processes instead. :class:`TrainingData` makes that choice in
one place, for training, validation loss and validation decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner.data.features import ImageFiles, raise_image_errors, split_features
from captioner.data.prepare import PreparedDataset
from captioner.errors import ConfigError
from captioner.training.batching import Batch, CaptionBatches

if TYPE_CHECKING:
    from captioner.models.captioner import Captioner
    from captioner.training.config import TrainConfig
    from captioner.training.distributed import Distributed


def load_dataset(config: "TrainConfig") -> PreparedDataset:
    """The prepared folder a run trains on, with the splits training needs."""
    dataset = PreparedDataset(config.data, image_root=config.images)
    if not dataset.split_images("train"):
        raise ConfigError(f"{config.data} has no training images")
    if not dataset.split_images("val"):
        raise ConfigError(f"{config.data} has no validation images: training selects its best epoch on them")
    return dataset


class TrainingData:
    """The dataset, the batch plans of train and val, and the inputs of each planned batch."""

    def __init__(self, model: "Captioner", dataset: PreparedDataset, config: "TrainConfig", dist_info: "Distributed", device: torch.device, *, epoch: int) -> None:
        self.model, self.dataset, self.config, self.device = model, dataset, config, device
        plan = {"batch_size": config.batch_size, "seq_per_img": config.seq_per_img, "seed": config.seed}
        self.train_batches = CaptionBatches.for_split(dataset, "train", **plan, rank=dist_info.rank, world_size=dist_info.world_size)
        self.val_batches = CaptionBatches.for_split(dataset, "val", **plan)
        if len(self.train_batches) == 0:
            raise ConfigError("no training batches: the training split has no captions to learn from, or fewer images than processes")
        # Cached features serve every epoch before fine-tuning starts (and validation of those epochs).
        fine_tunes_from_start = bool(config.fine_tune_encoder) and config.fine_tune_from_epoch <= epoch
        cached = not model.encoder_in_checkpoint and not fine_tunes_from_start
        self.features = {split: self._cached(split, dist_info) if cached else None for split in ("train", "val")}
        self.paths = {split: [dataset.image_path(i) for i in dataset.split_images(split)] for split in ("train", "val")}

    def _cached(self, split: str, dist_info: "Distributed") -> "np.ndarray":
        config = self.config
        if dist_info.is_main:
            features = split_features(
                self.model, self.dataset, split, cache_dir=config.feature_cache, batch_size=config.encode_batch_size,
                workers=config.workers, device=self.device, progress=config.progress,
            )
        dist_info.barrier()  # rank 0 builds the cache, the others then read it
        if not dist_info.is_main:
            features = split_features(self.model, self.dataset, split, cache_dir=config.feature_cache, device=self.device, progress=False)
        return features

    def decoding_features(self, split: str, fine_tuning: bool) -> "np.ndarray | None":
        """What validation decodes from: the split's cached features, or None (decode the images)."""
        return None if fine_tuning else self.features[split]

    def inputs(self, split: str, batches: list[Batch], fine_tuning: bool) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Each batch with its inputs, in order: cached features (N, P, D), or images (N, 3, S, S)
        once ``fine_tuning`` trains the encoder (or when there is no cache)."""
        features = self.decoding_features(split, fine_tuning)
        if features is not None:
            for batch in batches:
                yield batch, torch.from_numpy(np.asarray(features[batch.positions], dtype=np.float32))  # (N, P, D)
            return
        # Images are decoded in `workers` processes, in batch order, while the model trains on the
        # batch before. The loader's own generator keeps it from drawing on the global random
        # stream, which resume restores exactly.
        loader = DataLoader(
            ImageFiles(self.paths[split], self.model.preprocessing),
            batch_sampler=[[int(p) for p in batch.positions] for batch in batches],
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(0),
        )
        for batch, (images, errors) in zip(batches, loader):
            raise_image_errors(errors)
            yield batch, images  # (N, 3, S, S)

