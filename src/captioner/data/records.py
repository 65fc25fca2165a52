"""The one internal form of a caption dataset: images with their captions and split."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")

#: Split names found in the wild, mapped to ours. ``restval`` (Karpathy's COCO split) is handled
#: separately because where it goes is the user's choice.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class CaptionRecord:
    """One image and every caption written for it."""

    image: str  # path relative to the dataset's image root (or absolute)
    captions: list[str]
    split: str  # one of SPLITS
    image_id: str = ""  # the source's own id (COCO id, Flickr file name, ...); defaults to `image`

    def __post_init__(self) -> None:
        if not self.image_id:
            self.image_id = self.image


@dataclass
class CaptionDataset:
    """Records read from any supported format, plus where their images live."""

    records: list[CaptionRecord]
    image_root: Path
    format: str
    source: list[str] = field(default_factory=list)
    #: What the reader skipped, as {reason: count}, e.g. {"empty caption": 2}.
    dropped: Counter = field(default_factory=Counter)
    #: What the reader repaired and kept, one line each (e.g. bytes that were not UTF-8).
    warnings: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[CaptionRecord]:
        return [record for record in self.records if record.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {"images": n, "captions": m}} for every split present."""
        result: dict[str, dict[str, int]] = {}
        for record in self.records:
            entry = result.setdefault(record.split, {"images": 0, "captions": 0})
            entry["images"] += 1
            entry["captions"] += len(record.captions)
        return result


def normalise_split(name: str, *, restval: str = "train") -> str | None:
    """Map a split name from a file to ours; None means "drop this image"."""
    key = name.strip().lower()
    if key == "restval":
        return None if restval == "drop" else restval
    return SPLIT_ALIASES.get(key)


def hash_split(image: str, fractions: tuple[float, float, float]) -> str:
    """A deterministic split for an image name: same name, same split, on every machine and run."""
    digest = hashlib.sha1(image.encode("utf-8", "surrogatepass")).digest()  # JSON escapes can give lone surrogates
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    train, val, _ = fractions
    if position < train:
        return "train"
    if position < train + val:
        return "val"
    return "test"
