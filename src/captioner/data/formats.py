"""Readers for every caption dataset format captioner understands, into one :class:`CaptionDataset`.

========== ===================================================================================
format     files
========== ===================================================================================
karpathy   Karpathy's split JSON: ``dataset_coco.json`` / ``dataset_flickr8k.json`` /
           ``dataset_flickr30k.json`` (``images[*].filepath/filename/split/sentences[*].raw``)
coco       COCO annotation JSON (``captions_train2014.json``: ``images[*].id/file_name``,
           ``annotations[*].image_id/caption``); the split comes from the file name or ``split``
flickr8k   ``Flickr8k.token.txt`` (``image.jpg#N<TAB>caption``) with the official
           ``Flickr_8k.{train,dev,test}Images.txt`` lists found beside it or passed as sources
csv        ``image,caption[,split]`` with a header (also Kaggle's ``captions.txt`` and the
           ``|``-separated Flickr30k ``results.csv``); one row per caption
jsonl      one JSON object per line: ``{"image": ..., "caption": ... | "captions": [...], "split": ...}``
========== ===================================================================================

Images with no split get a deterministic one from a hash of their name (``split_fractions``),
unless Flickr split lists are given. Nothing here opens images; :mod:`captioner.data.prepare` does.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from captioner.data.records import SPLITS, CaptionDataset, CaptionRecord, hash_split, normalise_split
from captioner.errors import DatasetError

FORMATS = ("karpathy", "coco", "flickr8k", "csv", "jsonl")

IMAGE_COLUMNS = ("image", "image_name", "filename", "file_name", "file", "path", "image_path", "img")
CAPTION_COLUMNS = ("caption", "comment", "text", "sentence", "description", "raw")
SPLIT_COLUMNS = ("split", "subset", "set")

_FLICKR_SPLIT_FILE = re.compile(r"(train|dev|val|test)Images\.txt$", re.IGNORECASE)


@dataclass(frozen=True)
class ReadOptions:
    """Choices that apply across formats."""

    restval: str = "train"  # where Karpathy's COCO "restval" images go: train, val, test or drop
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # for files with no split
    split: str | None = None  # force every record of a file without splits into this split

    def __post_init__(self) -> None:
        if self.restval not in ("train", "val", "test", "drop"):
            raise DatasetError(f"restval must be train, val, test or drop, not {self.restval!r}")
        fractions = self.split_fractions
        if len(fractions) != 3 or not all(isinstance(f, (int, float)) and math.isfinite(f) and f >= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, not {fractions}")
        if self.split is not None and self.split not in SPLITS:
            raise DatasetError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")


def read_dataset(
    sources: Iterable[str | Path],
    image_root: str | Path | None = None,
    *,
    format: str = "auto",
    options: ReadOptions | None = None,
) -> CaptionDataset:
    """Read caption files in one format into a :class:`CaptionDataset`.

    ``sources`` are the caption files (for ``flickr8k``, the token file and optionally the split
    lists; for ``coco``, one annotation file per split). ``image_root`` is the folder that image
    names are relative to; by default the folder of the first source.
    """
    options = options or ReadOptions()
    paths = [Path(source) for source in sources]
    if not paths:
        raise DatasetError("no caption file given")
    for path in paths:
        if not path.exists():
            raise DatasetError(f"caption file {path} does not exist")
        if path.is_dir():
            raise DatasetError(f"{path} is a folder; give the caption file inside it")
        if not path.is_file():
            raise DatasetError(f"{path} is not a regular file (a pipe or a device): save the captions to a file")
    if format == "auto":
        format = detect_format(paths[0])
    if format not in FORMATS:
        raise DatasetError(f"unknown format {format!r}; choose from auto, {', '.join(FORMATS)}")
    root = Path(image_root) if image_root is not None else paths[0].parent
    reader = {"karpathy": _read_karpathy, "coco": _read_coco, "flickr8k": _read_flickr8k, "csv": _read_table, "jsonl": _read_table}[format]
    read_dropped: Counter = Counter()
    records = [_without_surrogates(record) for record in reader(paths, root, options, read_dropped, format)]
    dropped: Counter = Counter()
    for reason, count in read_dropped.items():
        dropped[_repair_text(reason)] += count
    records = _merge_duplicates(records, dropped)
    if not records:
        raise DatasetError(f"no usable captions in {', '.join(map(str, paths))}")
    warnings = []
    repaired = sum("\ufffd" in caption for record in records for caption in record.captions)
    if repaired:
        warnings.append(f"{repaired} caption(s) held bytes that are not UTF-8 (or lone surrogate escapes); they were replaced and the captions kept")
    return CaptionDataset(
        records=records, image_root=root, format=format, source=[str(p.resolve()) for p in paths], dropped=dropped, warnings=warnings
    )


def detect_format(path: Path) -> str:
    """Guess the format from the file's name and first bytes."""
    name = path.name.lower()
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return "jsonl"
    head = _read_text(path)[:4096] if path.stat().st_size < 2_000_000 else _read_head(path)
    stripped = head.lstrip()
    if name.endswith(".json") or stripped.startswith("{"):
        if stripped.startswith("{") and "\n{" in stripped and not name.endswith(".json"):
            return "jsonl"
        if re.search(r'"sentences"\s*:', head):
            return "karpathy"
        if re.search(r'"annotations"\s*:', head):
            return "coco"
        if name.endswith(".json"):
            data = _load_json(path)
            if isinstance(data, dict) and isinstance(data.get("images"), list):
                first = data["images"][0] if data["images"] else {}
                if isinstance(first, dict) and "sentences" in first:
                    return "karpathy"
                if "annotations" in data:
                    return "coco"
            raise DatasetError(f"cannot tell the format of {path}: JSON, but neither Karpathy's (images[*].sentences) nor COCO's (annotations)")
        return "jsonl"
    first_line = head.splitlines()[0] if head else ""
    if re.match(r"^[^\t#]+#\d+\t", first_line):
        return "flickr8k"
    if _FLICKR_SPLIT_FILE.search(name):
        raise DatasetError(f"{path} is a Flickr split list; give the token file (Flickr8k.token.txt) first")
    return "csv"


# ----- readers ------------------------------------------------------------------------------


def _read_karpathy(paths: list[Path], root: Path, options: ReadOptions, dropped: Counter, _: str) -> list[CaptionRecord]:
    records = []
    for path in paths:
        data = _load_json(path)
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DatasetError(f"{path}: not a Karpathy split file (no top-level 'images' list)")
        for number, entry in enumerate(images):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: images[{number}] is not an object")
            filename = _require(entry, "filename", path, f"images[{number}]")
            if not isinstance(filename, str):
                raise DatasetError(f"{path}: images[{number}].filename is {_kind(filename)}, not a file name")
            filepath = entry.get("filepath")
            if filepath is not None and not isinstance(filepath, str):
                raise DatasetError(f"{path}: images[{number}].filepath is {_kind(filepath)}, not a folder name")
            raw_split = entry.get("split")
            if raw_split is None:
                split = options.split or hash_split(filename, options.split_fractions)
            else:
                split = normalise_split(str(raw_split), restval=options.restval)
                if split is None:
                    dropped[f"split '{_shown(str(raw_split))}' left out"] += 1
                    continue
            sentences = _require(entry, "sentences", path, f"images[{number}]")
            if not isinstance(sentences, list):
                raise DatasetError(f"{path}: images[{number}].sentences is not a list")
            captions = []
            for sentence in sentences:
                if isinstance(sentence, dict):
                    text = sentence.get("raw")
                    if text is None and isinstance(sentence.get("tokens"), list):
                        text = " ".join(map(str, sentence["tokens"]))
                else:
                    text = sentence if isinstance(sentence, str) else None
                captions.append(text)
            image = f"{filepath}/{filename}" if filepath else filename
            image_id = str(entry.get("cocoid", entry.get("imgid", filename)))
            records.append(CaptionRecord(image=image, captions=_clean_captions(captions, dropped), split=split, image_id=image_id))
    return records


def _read_coco(paths: list[Path], root: Path, options: ReadOptions, dropped: Counter, _: str) -> list[CaptionRecord]:
    records = []
    for path in paths:
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
            raise DatasetError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
        split = options.split or _split_from_name(path.name)
        if split is None:
            raise DatasetError(f"cannot tell which split {path.name} is (no train/val/test in its name); name it with --split")
        # COCO 2014 keeps train and val images in train2014/ and val2014/ below the image root.
        folder_match = re.search(r"((?:train|val|test)20\d\d)", path.name)
        prefix = folder_match.group(1) if folder_match and (root / folder_match.group(1)).is_dir() else None
        names: dict[Any, str] = {}
        for number, entry in enumerate(data["images"]):
            if not isinstance(entry, dict):
                raise DatasetError(f"{path}: images[{number}] is not an object")
            image_id = _id(_require(entry, "id", path, f"images[{number}]"), path, f"images[{number}].id")
            file_name = _require(entry, "file_name", path, f"images[{number}]")
            if not isinstance(file_name, str):
                raise DatasetError(f"{path}: images[{number}].file_name is {_kind(file_name)}, not a file name")
            if image_id in names:
                dropped["duplicate image id"] += 1
                continue
            names[image_id] = f"{prefix}/{file_name}" if prefix else str(file_name)
        captions: dict[Any, list] = {image_id: [] for image_id in names}
        for number, annotation in enumerate(data["annotations"]):
            if not isinstance(annotation, dict):
                raise DatasetError(f"{path}: annotations[{number}] is not an object")
            image_id = _id(_require(annotation, "image_id", path, f"annotations[{number}]"), path, f"annotations[{number}].image_id")
            if image_id not in captions:
                dropped["caption of an unknown image id"] += 1
                continue
            captions[image_id].append(annotation.get("caption"))
        for image_id, name in names.items():
            records.append(CaptionRecord(image=name, captions=_clean_captions(captions[image_id], dropped), split=split, image_id=str(image_id)))
    return records


def _read_flickr8k(paths: list[Path], root: Path, options: ReadOptions, dropped: Counter, _: str) -> list[CaptionRecord]:
    token_files = [p for p in paths if not _FLICKR_SPLIT_FILE.search(p.name)]
    split_of = _flickr_split_lists(paths)
    captions: dict[str, list] = {}
    for path in token_files:
        for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            name_part, tab, caption = line.partition("\t")
            if not tab:
                raise DatasetError(f"{path}:{line_number}: expected 'image.jpg#N<TAB>caption', found no tab")
            image = name_part.rsplit("#", 1)[0].strip()
            if not image:
                raise DatasetError(f"{path}:{line_number}: empty image name")
            captions.setdefault(image, []).append(caption)
    records = []
    for image, texts in captions.items():
        if split_of:
            split = split_of.get(image)
            if split is None:
                dropped["image in no split list"] += 1
                continue
        else:
            split = options.split or hash_split(image, options.split_fractions)
        records.append(CaptionRecord(image=image, captions=_clean_captions(texts, dropped), split=split))
    return records


def _read_table(paths: list[Path], root: Path, options: ReadOptions, dropped: Counter, format: str) -> list[CaptionRecord]:
    """CSV and JSONL: one row per caption (or per image, with a ``captions`` list)."""
    split_lists = [p for p in paths if _FLICKR_SPLIT_FILE.search(p.name)]
    split_of = _flickr_split_lists(split_lists) if split_lists else {}
    rows: list[tuple[str, list, str | None]] = []
    for path in (p for p in paths if p not in split_lists):
        rows.extend(_jsonl_rows(path) if format == "jsonl" else _csv_rows(path))
    grouped: dict[str, tuple[list, str | None]] = {}
    for image, texts, raw_split in rows:
        captions, first_split = grouped.setdefault(image, ([], raw_split))
        if raw_split is not None and first_split is not None and raw_split.strip().lower() != first_split.strip().lower():
            raise DatasetError(f"image {_shown(image)} is listed in two splits ({_shown(first_split)} and {_shown(raw_split)})")
        if first_split is None and raw_split is not None:
            grouped[image] = (captions, raw_split)
        captions.extend(texts)
    records = []
    for image, (texts, raw_split) in grouped.items():
        if raw_split is not None and raw_split.strip():
            split = normalise_split(raw_split, restval=options.restval)
            if split is None:
                dropped[f"split '{_shown(str(raw_split))}' left out"] += 1
                continue
        elif split_of:
            split = split_of.get(image) or split_of.get(Path(image).name)
            if split is None:
                dropped["image in no split list"] += 1
                continue
        else:
            split = options.split or hash_split(image, options.split_fractions)
        records.append(CaptionRecord(image=image, captions=_clean_captions(texts, dropped), split=split))
    return records


def _csv_rows(path: Path) -> list[tuple[str, list, str | None]]:
    text = _read_text(path)
    if not text.strip():
        raise DatasetError(f"{path} is empty")
    header_line = text.splitlines()[0]
    delimiter = max(",|\t;", key=header_line.count) if any(c in header_line for c in ",|\t;") else ","
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = [column.strip().lower() for column in next(reader)]
        image_col = _column(header, IMAGE_COLUMNS, path, "image")
        caption_col = _column(header, CAPTION_COLUMNS, path, "caption")
        split_col = next((header.index(c) for c in SPLIT_COLUMNS if c in header), None)
        rows = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) <= max(image_col, caption_col):
                raise DatasetError(f"{path}:{reader.line_num}: expected at least {max(image_col, caption_col) + 1} columns, found {len(row)}")
            split = row[split_col] if split_col is not None and split_col < len(row) else None
            rows.append((row[image_col].strip(), [row[caption_col]], split))
    except csv.Error as error:
        raise DatasetError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None
    return rows


def _jsonl_rows(path: Path) -> list[tuple[str, list, str | None]]:
    rows = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        entry = _parse_json(line, path, line_number)
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}:{line_number}: expected a JSON object")
        image_key = next((k for k in IMAGE_COLUMNS if k in entry), None)
        if image_key is None:
            raise DatasetError(f"{path}:{line_number}: no image field (one of {', '.join(IMAGE_COLUMNS)})")
        if isinstance(entry.get("captions"), list):
            texts = entry["captions"]
        else:
            caption_key = next((k for k in CAPTION_COLUMNS if k in entry), None)
            if caption_key is None:
                raise DatasetError(f"{path}:{line_number}: no caption field ('caption' or a 'captions' list)")
            texts = [entry[caption_key]]
        image = entry[image_key]
        if isinstance(image, bool) or not isinstance(image, (str, int)):
            raise DatasetError(f"{path}:{line_number}: {image_key} is {_kind(image)}, not a file name")
        split = next((entry[k] for k in SPLIT_COLUMNS if k in entry), None)
        rows.append((str(image).strip(), texts, None if split is None else str(split)))
    return rows


# ----- shared pieces ------------------------------------------------------------------------


def _clean_captions(captions: Iterable[Any], dropped: Counter) -> list[str]:
    kept = []
    for caption in captions:
        if not isinstance(caption, str) or not caption.strip():
            dropped["empty caption"] += 1
            continue
        kept.append(" ".join(caption.split()))  # newlines and runs of spaces -> one space
    return kept


def _merge_duplicates(records: list[CaptionRecord], dropped: Counter) -> list[CaptionRecord]:
    """One record per image: repeated entries merge their captions; images left with none go."""
    merged: dict[str, CaptionRecord] = {}
    for record in records:
        existing = merged.get(record.image)
        if existing is None:
            merged[record.image] = record
        elif existing.split != record.split:
            dropped["image repeated in another split (kept the first)"] += 1
        else:
            dropped["repeated image entry (captions merged)"] += 1
            existing.captions.extend(c for c in record.captions if c not in existing.captions)
    result = []
    for record in merged.values():
        if record.captions:
            result.append(record)
        else:
            dropped["image with no caption"] += 1
    return result


def _flickr_split_lists(paths: list[Path]) -> dict[str, str]:
    """{image name: split} from Flickr_8k.*Images.txt files given, or found beside the token file."""
    lists = [p for p in paths if _FLICKR_SPLIT_FILE.search(p.name)]
    if not lists:
        for token_file in paths:
            lists.extend(sorted(p for p in token_file.parent.glob("*Images.txt") if _FLICKR_SPLIT_FILE.search(p.name)))
    split_of: dict[str, str] = {}
    for list_path in lists:
        split = normalise_split(_FLICKR_SPLIT_FILE.search(list_path.name).group(1))  # type: ignore[union-attr]
        for name in _read_text(list_path).split():
            previous = split_of.setdefault(name, split)  # type: ignore[arg-type]
            if previous != split:
                raise DatasetError(f"image {name} is in two split lists ({previous} and {split})")
    return split_of


def _split_from_name(name: str) -> str | None:
    lowered = name.lower()
    for key, split in (("train", "train"), ("val", "val"), ("dev", "val"), ("test", "test")):
        if key in lowered:
            return split
    return None


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DatasetError(f"{path}: no {what} column in the header (expected one of {', '.join(names)}; found {_shown(', '.join(header))})")


def _require(entry: dict, key: str, path: Path, where: str) -> Any:
    if key not in entry:
        raise DatasetError(f"{path}: {where} has no '{key}'")
    return entry[key]


#: Largest caption file read: COCO's training captions are 90 MB, Flickr30k's 25 MB.
MAX_CAPTION_FILE_BYTES = 2**30


def _read_text(path: Path) -> str:
    """File text as UTF-8 (BOM allowed). Bytes that are not UTF-8 become U+FFFD rather than abort.
    A caption file is a regular file (checked by :func:`read_dataset`: a pipe or /dev/zero would be
    read without end) of at most :data:`MAX_CAPTION_FILE_BYTES`."""
    try:
        if path.stat().st_size > MAX_CAPTION_FILE_BYTES:
            raise DatasetError(f"{path} is {path.stat().st_size:,} bytes, more than a caption file holds ({MAX_CAPTION_FILE_BYTES:,})")
        data = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror}") from None
    return data.decode("utf-8-sig", errors="replace")


def _read_head(path: Path, size: int = 4096) -> str:
    with open(path, "rb") as handle:
        return handle.read(size).decode("utf-8-sig", errors="replace")


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    if not text.strip():
        raise DatasetError(f"{path} is empty")
    return _parse_json(text, path)


def _parse_json(text: str, path: Path, line_number: int | None = None) -> Any:
    """``json.loads`` of a whole file (or of one line of it), with every way that can fail as a DatasetError."""
    where = f"{path}:{line_number}: not valid JSON" if line_number is not None else f"{path} is not valid JSON"
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        if line_number is not None:
            raise DatasetError(f"{where} ({error.msg})") from None
        raise DatasetError(f"{where}: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
        raise DatasetError(f"{where} (nested too deeply)") from None
    except ValueError as error:  # a number over Python's 4300-digit limit for int()
        raise DatasetError(f"{where} ({str(error).split(';')[0]})") from None


def _id(value: Any, path: Path, where: str) -> str | int | float:
    """A COCO id: a number or a string (anything else cannot be matched up)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{path}: {where} is {_kind(value)}, not a number or a string")
    return value


def _shown(text: str, limit: int = 120) -> str:
    """Text from the file as it may appear in a one-line message: whitespace runs (newlines too) as one space, shortened."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in _repair_text(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """What a JSON value is, in a word or two, for messages."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _repair_text(text: str) -> str:
    """Lone surrogates (from JSON escapes such as "\\ud800") -> U+FFFD: they cannot be printed or saved as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def _without_surrogates(record: CaptionRecord) -> CaptionRecord:
    record.image = _repair_text(record.image)
    record.image_id = _repair_text(record.image_id)
    record.captions = [_repair_text(caption) for caption in record.captions]
    return record
