"""``captioner prepare``: a caption dataset -> a prepared folder that training reads.

The folder holds::

    prepared.json     what was read, the options, per-split counts, and what was dropped and why
    vocab.json        the vocabulary, built from the training split only
    images.json       every kept image: {"image", "image_id", "split", "captions"} (raw references)
    train.npz         encoded captions of a split: tokens (N, L) int32 <start> w1 .. wn <end> <pad>..,
    val.npz           lengths (N,) counting <start> and <end>, image_index (N,) into images.json
    test.npz

It is built under a temporary name and renamed into place, so a crash or Ctrl-C never leaves a
half-written folder, and an existing folder is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from captioner import ranges
from captioner.atomic import atomic_directory, check_replaceable, recover_directory, write_bytes_atomic
from captioner.data.images import load_image
from captioner.data.records import SPLITS, CaptionDataset
from captioner.data.vocabulary import Vocabulary, tokenize
from captioner.errors import CaptionerError, DatasetError, ImageLoadError
from captioner.locking import exclusive_writer

PREPARED_FORMAT = 1


@dataclass
class PrepareOptions:
    min_word_freq: int = 5
    max_length: int = 50  # captions with more words are left out of training (kept as references)
    verify_images: bool = True  # decode every image once to find truncated or non-image files
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        ranges.whole_number("min_word_freq", self.min_word_freq, 1, 10**9)
        ranges.whole_number("max_length", self.max_length, 1, 1000)
        ranges.whole_number("workers", self.workers, 1, 256)


@dataclass
class PrepareReport:
    out: Path
    counts: dict[str, dict[str, int]]
    vocab_size: int
    dropped: dict[str, int]
    examples: dict[str, list[str]]  # a few image names per drop reason
    warnings: list[str]

    def lines(self) -> list[str]:
        lines = [f"prepared {self.out}"]
        for split in SPLITS:
            entry = self.counts.get(split, {"images": 0, "captions": 0, "encoded": 0})
            lines.append(f"  {split:5s}: {entry['images']:7,d} images  {entry['captions']:8,d} captions  {entry['encoded']:8,d} encoded for training")
        lines.append(f"  vocabulary: {self.vocab_size:,d} words (with 4 special tokens)")
        if self.dropped:
            lines.append("  dropped:")
            for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
                example = self.examples.get(reason)
                suffix = f" (e.g. {', '.join(example[:3])})" if example else ""
                lines.append(f"    {count:7,d}  {reason}{suffix}")
        lines.extend(f"  warning: {warning}" for warning in self.warnings)
        return lines


def prepare(dataset: CaptionDataset, out: str | Path, options: PrepareOptions | None = None) -> PrepareReport:
    """Check images, build the vocabulary on train, encode every split, write ``out`` atomically
    (one process at a time: a second ``prepare`` into the same folder is refused while this one runs)."""
    with exclusive_writer(out):
        return _prepare(dataset, Path(out), options or PrepareOptions())


def _prepare(dataset: CaptionDataset, out: Path, options: PrepareOptions) -> PrepareReport:
    image_root = dataset.image_root.resolve()
    for inside, name in [(image_root, "the image folder"), *((Path(source).resolve(), source) for source in dataset.source)]:
        if out.resolve() == inside or out.resolve() in inside.parents:
            raise CaptionerError(f"--out {out} holds {name}: the prepared folder must be a folder of its own")
    check_replaceable(out, overwrite=options.overwrite, marker="prepared.json", what="a prepared folder")  # before any slow work
    if not image_root.is_dir():
        raise DatasetError(f"image folder {dataset.image_root} {'is not a folder' if image_root.exists() else 'does not exist'}")

    dropped: Counter = Counter(dataset.dropped)
    examples: dict[str, list[str]] = {}
    failures = _check_images([image_root / record.image for record in dataset.records], options)
    records = []
    for record, failure in zip(dataset.records, failures):
        if failure is None:
            records.append(record)
        else:
            dropped[failure[0]] += 1
            examples.setdefault(failure[0], []).append(failure[1])

    # Word counts come from training captions that training will see (not over-long, not empty).
    def usable(caption: str) -> bool:
        return 0 < len(tokenize(caption)) <= options.max_length

    train_captions = [c for r in records if r.split == "train" for c in r.captions if usable(c)]
    if not train_captions and not any(r.captions for r in records):
        raise DatasetError("no training captions left after dropping bad images and captions, and none to evaluate on; nothing to prepare")
    # Without training captions the folder is a set to evaluate models on (references are raw text;
    # a model brings its own vocabulary): its vocabulary is the special tokens alone.
    evaluation_only = not train_captions
    vocab = Vocabulary.build(train_captions, min_word_freq=options.min_word_freq, max_length=options.max_length)

    images = []
    encoded: dict[str, list[tuple[list[int], int]]] = {split: [] for split in SPLITS}
    counts = {split: {"images": 0, "captions": 0, "encoded": 0} for split in SPLITS}
    for record in records:
        index = len(images)
        images.append({"image": record.image, "image_id": record.image_id, "split": record.split, "captions": record.captions})
        counts[record.split]["images"] += 1
        counts[record.split]["captions"] += len(record.captions)
        for caption in record.captions:
            words = tokenize(caption)
            if not words:
                dropped["caption with no words (kept as a reference)"] += 1
            elif len(words) > options.max_length:
                dropped[f"caption over {options.max_length} words (kept as a reference)"] += 1
            elif not evaluation_only:  # (an evaluation-only set has no vocabulary to encode with)
                encoded[record.split].append((vocab.encode(words), index))
                counts[record.split]["encoded"] += 1

    warnings = list(dataset.warnings)
    warnings.extend(f"split '{split}' has no images" for split in SPLITS if counts[split]["images"] == 0 and not (evaluation_only and split == "train"))
    if evaluation_only:
        warnings.append("no training split: this folder is for evaluating models (captioner evaluate MODEL --data it), not for training")
    unknown = 1.0 - vocab.coverage(c for r in records if r.split == "val" for c in r.captions)
    meta = {
        "format": PREPARED_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": dataset.source,
        "source_format": dataset.format,
        "image_root": str(image_root),
        "options": {key: value for key, value in asdict(options).items() if key in ("min_word_freq", "max_length", "verify_images")},
        "counts": counts,
        "vocab_size": len(vocab),
        "evaluation_only": evaluation_only,
        "val_unknown_word_rate": round(unknown, 4),
        "dropped": dict(dropped),
        "dropped_examples": {reason: names[:20] for reason, names in examples.items()},
        "warnings": warnings,
    }
    with atomic_directory(out, overwrite=options.overwrite, marker="prepared.json", what="a prepared folder") as building:
        vocab.save(building / "vocab.json")
        (building / "images.json").write_text(json.dumps(images), encoding="utf-8")
        for split in SPLITS:
            _save_split(building / f"{split}.npz", encoded[split])
        (building / "prepared.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return PrepareReport(out, counts, len(vocab), dict(dropped), examples, warnings)


def _save_split(path: Path, items: list[tuple[list[int], int]]) -> None:
    width = max((len(ids) for ids, _ in items), default=2)
    tokens = np.zeros((len(items), width), dtype=np.int32)  # <pad> is 0
    lengths = np.zeros(len(items), dtype=np.int32)
    image_index = np.zeros(len(items), dtype=np.int32)
    for row, (ids, index) in enumerate(items):
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
        image_index[row] = index
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens, lengths=lengths, image_index=image_index)
    write_bytes_atomic(path, buffer.getvalue())


def _check_images(paths: list[Path], options: PrepareOptions) -> list[tuple[str, str] | None]:
    """For each path: None if usable, else (reason, name)."""

    def check(path: Path) -> tuple[str, str] | None:
        if not path.is_file():
            return ("missing image file", path.name)
        if not options.verify_images:
            return ("empty image file", path.name) if path.stat().st_size == 0 else None
        try:
            load_image(path, draft=64)
        except ImageLoadError as error:
            return ("unreadable image: " + error.reason.split(" (")[0], path.name)
        return None

    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
        results = pool.map(check, paths)  # threads: Pillow decodes with the GIL released
        what = "checking images" if options.verify_images else "finding images"
        return list(tqdm(results, total=len(paths), desc=what, unit="img", disable=not options.progress or None, leave=False))


def _layout_problem(meta: Any, images: Any) -> str | None:
    """What is wrong with a prepared folder's prepared.json and images.json as read (None: nothing):
    the fields everything else reads, of the types it reads them as."""
    if not isinstance(meta, dict) or not isinstance(meta.get("image_root"), str):
        return "prepared.json has no image_root"
    if not isinstance(meta.get("format", 0), int) or isinstance(meta.get("format"), bool):
        return "prepared.json's format is not a whole number"
    if not isinstance(images, list):
        return "images.json is not a list of images"
    for i, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("image"), str) or not image["image"] or not isinstance(image.get("split"), str):
            return f"images.json entry {i} lacks its image file or split"
        captions = image.get("captions")
        if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
            return f"images.json entry {i} ({image['image']}): its captions are not a list of text"
    return None


class PreparedDataset:
    """A folder written by :func:`prepare`, read back."""

    def __init__(self, root: str | Path, *, image_root: str | Path | None = None) -> None:
        self.root = Path(root)
        recover_directory(self.root, marker="prepared.json")  # a crash while it was being replaced
        meta_path = self.root / "prepared.json"
        if not meta_path.is_file():
            raise DatasetError(f"{self.root} is not a prepared dataset (no prepared.json); run 'captioner prepare' first")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.images: list[dict] = json.loads((self.root / "images.json").read_text(encoding="utf-8"))
        except RecursionError:
            raise DatasetError(f"{self.root} is damaged (JSON nested too deeply); prepare it again") from None
        except (OSError, ValueError) as error:  # unreadable, not JSON, not UTF-8
            raise DatasetError(f"{self.root} is damaged ({error}); prepare it again") from None
        problem = _layout_problem(self.meta, self.images)
        if problem:
            raise DatasetError(f"{self.root} is damaged ({problem}); prepare it again")
        if self.meta.get("format", 0) > PREPARED_FORMAT:
            raise DatasetError(f"{self.root} was prepared by a newer captioner (format {self.meta['format']}); upgrade captioner")
        self.vocab = Vocabulary.load(self.root / "vocab.json")
        self.image_root = Path(image_root) if image_root is not None else Path(self.meta["image_root"])
        self._splits: dict[str, dict[str, np.ndarray]] = {}

    def image_path(self, index: int) -> Path:
        return self.image_root / self.images[index]["image"]

    def split_images(self, split: str) -> list[int]:
        """Indices into :attr:`images` of the images in ``split``, in file order."""
        return [i for i, image in enumerate(self.images) if image["split"] == split]

    def captions(self, split: str) -> dict[str, np.ndarray]:
        """{"tokens": (N, L) int32, "lengths": (N,), "image_index": (N,)} for ``split``."""
        if split not in self._splits:
            path = self.root / f"{split}.npz"
            if not path.is_file():
                raise DatasetError(f"{self.root} has no {split}.npz; prepare it again")
            with np.load(path, allow_pickle=False) as data:
                self._splits[split] = {key: data[key] for key in ("tokens", "lengths", "image_index")}
        return self._splits[split]

    def references(self, split: str) -> dict[int, list[str]]:
        """{image index: raw reference captions} for ``split``."""
        return {i: self.images[i]["captions"] for i in self.split_images(split)}
