"""The feature cache: encode each image once with a frozen encoder, train and evaluate the decoder from disk.

One ``.npy`` file per split holds float16 features (N, P, D) in the split's image order, memory-mapped
when read, plus a ``.json`` sidecar saying what it holds. Its name carries a key: a hash of the
encoder config, the preprocessing, and each image's path, size and modification time, so changing
any of them builds a new cache instead of silently reusing a stale one. Files are written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioner.atomic import write_text_atomic
from captioner.data.images import Preprocessing, load_image
from captioner.errors import CaptionerError, DatasetError, ImageLoadError
from captioner.threads import on_free_cores

if TYPE_CHECKING:
    from captioner.data.prepare import PreparedDataset
    from captioner.models.captioner import Captioner
    from captioner.models.encoder import Encoder


class ImageFiles(Dataset):
    """Preprocessed image tensors for a list of paths (decoding happens in DataLoader workers).

    Items are ``(tensor, error)``: a worker cannot re-raise our error types faithfully, so an
    unreadable image comes back as a zero tensor and its one-line message, raised by
    :func:`raise_image_errors` in the main process. ``view="flip"`` mirrors each image left to right
    (as :meth:`Captioner.encode` does for an ensemble's flipped view).
    """

    def __init__(self, paths: Sequence[Path], preprocessing: Preprocessing, view: str = "plain") -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.view = view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            image = load_image(self.paths[index], draft=self.preprocessing.draft_size)
        except ImageLoadError as error:
            size = self.preprocessing.image_size
            return torch.zeros(3, size, size), f"{error}; run 'captioner prepare' again to drop it"
        pixels = self.preprocessing(image)  # (3, S, S)
        return (pixels.flip(-1) if self.view == "flip" else pixels), ""


def raise_image_errors(errors: Sequence[str]) -> None:
    for error in errors:
        if error:
            raise CaptionerError(error)


def cache_key(encoder: "Encoder", preprocessing: Preprocessing, paths: Sequence[Path], view: str = "plain") -> str:
    digest = hashlib.sha256()
    described: dict = {"encoder": encoder.config.to_dict(), "preprocessing": preprocessing.to_dict()}
    if preprocessing.resize == "crop":  # JPEGs are decoded at draft_size, which crop raised from image_size
        described["draft_size"] = preprocessing.draft_size
    if view != "plain":
        described["view"] = view
    digest.update(json.dumps(described, sort_keys=True).encode())
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:16]


def cached_features(
    encoder: "Encoder",
    preprocessing: Preprocessing,
    paths: Sequence[Path],
    cache_dir: str | Path,
    name: str,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
    view: str = "plain",
) -> np.ndarray:
    """Features (N, P, D) float16 for ``paths`` (mirrored images for ``view="flip"``), memory-mapped
    from the cache; built first if needed."""
    cache_dir = Path(cache_dir)
    key = cache_key(encoder, preprocessing, paths, view)
    label = name if view == "plain" else f"{name}-{view}"
    array_path = cache_dir / f"{label}-{key}.npy"
    if not array_path.is_file():
        build_cache(encoder, preprocessing, paths, array_path, batch_size=batch_size, workers=workers, device=device, progress=progress, label=label, view=view)
    return open_cache(array_path, len(paths), encoder.feature_dim)


def open_cache(array_path: Path, images: int, feature_dim: int) -> np.ndarray:
    """The cache file memory-mapped, once it holds what :func:`build_cache` writes: float16 features
    (images, regions, feature_dim); a damaged one is one line saying how to rebuild it."""
    rebuild = f"delete {array_path} and it is built again"
    try:
        array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # truncated, empty, not .npy, pickled objects
        raise DatasetError(f"the feature cache {array_path.name} is damaged ({str(error).splitlines()[0]}): {rebuild}") from None
    if array.dtype != np.float16 or array.ndim != 3 or array.shape[0] != images or array.shape[2] != feature_dim:
        raise DatasetError(
            f"the feature cache {array_path.name} holds {array.dtype} {tuple(array.shape)}, not float16 features of {images} images x {feature_dim}: {rebuild}"
        )
    return array


def build_cache(
    encoder: "Encoder",
    preprocessing: Preprocessing,
    paths: Sequence[Path],
    array_path: Path,
    *,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    progress: bool,
    label: str,
    view: str = "plain",
) -> None:
    array_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    with torch.no_grad():
        probe = encoder(torch.zeros(1, 3, preprocessing.image_size, preprocessing.image_size, device=device))  # (1, P, D)
    shape = (len(paths), probe.shape[1], probe.shape[2])
    temp_path = array_path.with_name(f".{array_path.name}.{os.getpid()}.tmp")
    loader = DataLoader(
        ImageFiles(paths, preprocessing, view),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )
    start = time.perf_counter()
    try:
        array = np.lib.format.open_memmap(temp_path, mode="w+", dtype=np.float16, shape=shape)
        position = 0
        bar = tqdm(total=len(paths), desc=f"encoding {label} images", unit="img", disable=not progress or None)
        with torch.inference_mode():
            for images, errors in on_free_cores(loader):
                raise_image_errors(errors)
                features = encoder(images.to(device, non_blocking=True))  # (b, P, D)
                array[position : position + len(features)] = features.to(torch.float16).cpu().numpy()
                position += len(features)
                bar.update(len(features))
        bar.close()
        array.flush()
        del array
        os.replace(temp_path, array_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    elapsed = time.perf_counter() - start
    write_text_atomic(
        array_path.with_suffix(".json"),
        json.dumps(
            {
                "images": len(paths),
                "shape": list(shape),
                "dtype": "float16",
                "encoder": encoder.config.to_dict(),
                "preprocessing": preprocessing.to_dict(),
                "view": view,
                "seconds": round(elapsed, 1),
                "images_per_second": round(len(paths) / max(elapsed, 1e-9), 1),
            },
            indent=2,
        ),
    )


def split_features(
    model: "Captioner",
    dataset: "PreparedDataset",
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
        if len({view.shape for view in views}) != 1:
            raise DatasetError(f"the feature caches of the model's views do not match ({', '.join(str(tuple(view.shape)) for view in views)}): delete them and they are built again")
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
