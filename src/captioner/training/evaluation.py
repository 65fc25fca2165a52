"""Decode a split for real (no teacher forcing) and score it with the COCO caption metrics.

Used by validation during training and by ``captioner evaluate``. Features come from the cache when
the encoder is the installed pretrained one (frozen); a fine-tuned encoder encodes the images itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from captioner.data.prepare import PreparedDataset
from captioner.decoding import Caption, GenerationConfig, generate
from captioner.models.captioner import Captioner
from captioner.training.features import ImageFiles, cached_features, raise_image_errors


def split_features(
    model: Captioner,
    dataset: PreparedDataset,
    split: str,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> "np.ndarray | ViewFeatures | None":
    """Cached features (N, P, D) for a split ((N, V*P, D) for a model of V views, see
    :class:`ViewFeatures`), or None when the encoder's weights are not the package's."""
    if model.encoder_in_checkpoint:
        return None
    paths = [dataset.image_path(i) for i in dataset.split_images(split)]
    views = [
        cached_features(
            model.encoder,
            model.preprocessing,
            paths,
            cache_dir or dataset.root / "features",
            split,
            batch_size=batch_size,
            workers=workers,
            device=device,
            progress=progress,
            view=view,
        )
        for view in model.views
    ]
    return views[0] if len(views) == 1 else ViewFeatures(views)


class ViewFeatures:
    """The cached features of several views of a split, read as one array (N, V*P, D): rows are
    sliced from each view's memory-mapped file and put side by side, as the model's encoder would."""

    def __init__(self, views: Sequence[np.ndarray]) -> None:
        self.views = list(views)
        self.shape = (len(views[0]), sum(view.shape[1] for view in views), views[0].shape[2])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        """Rows (a slice or index array: (n, V*P, D)) or one row (an int: (V*P, D)), regions side by side."""
        return np.concatenate([np.asarray(view[rows]) for view in self.views], axis=-2)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)


def decode_split(
    model: Captioner,
    dataset: PreparedDataset,
    split: str,
    config: GenerationConfig,
    *,
    features: np.ndarray | None = None,
    limit: int = 0,
    batch_size: int = 50,
    workers: int = 2,
    progress: bool = True,
) -> dict[int, list[Caption]]:
    """{image index: captions} for the split's images (the first ``limit`` of them if limit > 0)."""
    indices = dataset.split_images(split)
    if limit:
        indices = indices[:limit]
    results: dict[int, list[Caption]] = {}
    bar = tqdm(total=len(indices), desc=f"decoding {split}", unit="img", disable=not progress or None, leave=False)
    if features is not None:
        for start in range(0, len(indices), batch_size):
            chunk = torch.from_numpy(np.asarray(features[start : start + batch_size], dtype=np.float32))  # (b, P, D)
            for index, captions in zip(indices[start : start + batch_size], generate(model, chunk, config)):
                results[index] = captions
            bar.update(len(chunk))
    else:
        loader = DataLoader(ImageFiles([dataset.image_path(i) for i in indices], model.preprocessing), batch_size=batch_size, num_workers=workers)
        position = 0
        for images, errors in loader:
            raise_image_errors(errors)
            for index, captions in zip(indices[position : position + len(images)], generate(model, images, config)):
                results[index] = captions
            position += len(images)
            bar.update(len(images))
    bar.close()
    return results


def score_split(
    dataset: PreparedDataset, captions: dict[int, list[Caption]], *, metrics: Sequence[str] | None = None
) -> dict[str, float]:
    """Corpus-level COCO metrics (0-100) of the best caption per image against all its references."""
    from captioner.metrics import score_captions

    generated = {index: found[0].text for index, found in captions.items()}
    references = {index: dataset.images[index]["captions"] for index in captions}
    return score_captions(generated, references, metrics=metrics)
