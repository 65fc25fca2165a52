"""How familiar a photo is to a model: its distance from the photos the model was trained on.

A model trained on Flickr8k knows people and dogs outdoors; steering its captions with the encoder's
ImageNet concepts (constrained beam search) names the zebra in a zoo photo, but on the photos it
knows it mostly forces words where none was wanted. So concepts steer only *unfamiliar* photos: those
farther from the training photos than most of the model's dev photos are (a deep nearest-neighbour
out-of-distribution test, Sun et al. 2022, "Out-of-Distribution Detection with Deep Nearest
Neighbors").

A photo is its pooled encoder features (the mean over regions and views, what the ImageNet classifier
reads), scaled to unit length. Its distance is 1 minus its cosine similarity to the nearest of K
centroids, a spherical k-means summary of the training photos (512 centroids of 1,280 floats in
float16 is 1.3 MB, against 15 MB for Flickr8k's 6,000 photos themselves). The dev photos' own
distances, sorted, turn a percentile into a distance: with ``concept_familiar_percentile = 70`` (the
shipped model's), a photo nearer than 70% of the dev photos is familiar. The file, ``familiar_photos.safetensors``, sits
in the checkpoint folder; ``scripts/familiar_photos.py`` builds it from a prepared dataset.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from captioner.errors import CheckpointError

FAMILIARITY_FILE = "familiar_photos.safetensors"
MAX_FAMILIARITY_BYTES = 64_000_000  # read no bigger file: 512 x 1,280 float16 is 1.3 MB
MAX_CENTROIDS = 65_536


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Region features (B, P, D) (an ensemble's views side by side: (B, V * P, D)) -> unit-length
    pooled features (B, D)."""
    return torch.nn.functional.normalize(features.float().mean(dim=1), dim=1)


def nearest_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, D) unit-length pooled features, (K, D) unit-length centroids -> (B,) 1 - cosine similarity
    to the nearest centroid, on the CPU."""
    return (1.0 - (points @ centroids.to(points.device).T).max(dim=1).values).cpu()


class Familiarity:
    """The training photos' centroids (K, D) and the dev photos' distances to them, sorted (N,)."""

    def __init__(self, centroids: torch.Tensor, dev_distances: torch.Tensor) -> None:
        self.centroids = torch.nn.functional.normalize(centroids.float(), dim=1)
        self.dev_distances = dev_distances.float().sort().values

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, P, D) features -> (B,) distances from the training photos, 0 (one of them) to 2."""
        return nearest_distances(pooled(features), self.centroids)

    def familiar(self, features: torch.Tensor, percentile: float) -> list[bool]:
        """Per image, whether it is nearer the training photos than ``percentile`` % of the dev photos;
        none is at 0."""
        if percentile <= 0:
            return [False] * features.shape[0]
        limit = torch.quantile(self.dev_distances, percentile / 100.0)
        return (self.distances(features) <= limit).tolist()

    def to_bytes(self) -> bytes:
        return save({"centroids": self.centroids.half().contiguous(), "dev_distances": self.dev_distances.contiguous()})

    @classmethod
    def read(cls, path: Path, feature_dim: int) -> Familiarity:
        """The file a checkpoint folder holds, checked: one clear line for anything wrong."""
        if path.stat().st_size > MAX_FAMILIARITY_BYTES:
            raise CheckpointError(f"{path} is {path.stat().st_size:,} bytes, more than familiar photos ever need ({MAX_FAMILIARITY_BYTES:,}); not reading it")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({str(error)[:120]})") from None
        centroids, dev = tensors.get("centroids"), tensors.get("dev_distances")
        if centroids is None or dev is None or set(tensors) != {"centroids", "dev_distances"}:
            raise CheckpointError(f"{path} must hold exactly 'centroids' and 'dev_distances', not {sorted(tensors)}")
        if centroids.dim() != 2 or centroids.shape[1] != feature_dim or not 1 <= centroids.shape[0] <= MAX_CENTROIDS:
            raise CheckpointError(f"{path}: centroids must be (K, {feature_dim}) with 1 <= K <= {MAX_CENTROIDS}, not {tuple(centroids.shape)}")
        if dev.dim() != 1 or dev.numel() == 0:
            raise CheckpointError(f"{path}: dev_distances must be a non-empty list, not shape {tuple(dev.shape)}")
        if not (centroids.is_floating_point() and dev.is_floating_point() and bool(torch.isfinite(centroids).all()) and bool(torch.isfinite(dev).all())):
            raise CheckpointError(f"{path} holds values that are not finite numbers")
        if not bool(((dev >= 0) & (dev <= 2)).all()):  # 1 - a cosine
            raise CheckpointError(f"{path}: dev_distances must lie from 0 to 2 (one minus a cosine), not {float(dev.min()):g} to {float(dev.max()):g}")
        if bool((centroids.float().norm(dim=1) == 0).any()):
            raise CheckpointError(f"{path}: a centroid is all zeros")
        return cls(centroids, dev)

    @classmethod
    def build(cls, training: torch.Tensor, dev: torch.Tensor, *, clusters: int = 512, iterations: int = 25, seed: int = 0) -> Familiarity:
        """Spherical k-means of the training photos' pooled features (N, D) (:func:`pooled`) into
        ``clusters`` centroids (at most N), seeded; then the dev photos' (M, D) distances to them."""
        points = training.float()
        generator = torch.Generator().manual_seed(seed)
        centroids = points[torch.randperm(points.shape[0], generator=generator)[: min(clusters, points.shape[0])]].clone()  # (K, D)
        for _ in range(iterations):
            nearest = (points @ centroids.T).argmax(dim=1)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
            used = torch.bincount(nearest, minlength=centroids.shape[0]) > 0
            centroids[used] = torch.nn.functional.normalize(sums[used], dim=1)  # an empty cluster keeps its centroid
        centroids = torch.nn.functional.normalize(centroids.half().float(), dim=1)  # as stored, then read
        return cls(centroids, nearest_distances(dev.float(), centroids))
