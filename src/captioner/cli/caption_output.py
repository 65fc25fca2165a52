"""``captioner caption --json FILE``: captions written as they are made, resumable, and shardable.

Records go to a *part* file as each batch is captioned (flushed, so a crash or Ctrl-C keeps every
caption made so far): ``FILE.partial`` for one process, ``FILE.rankR-of-W.partial`` for rank R of W
under torchrun. When every process is done, ``FILE`` is written in one step (a temporary file,
fsynced, renamed) with every record in input order, and the part files are removed. Until then an
earlier ``FILE`` is untouched.

``--resume`` reads the records already made (an earlier ``FILE`` and any part files, whatever the
number of processes that wrote them) and captions only the images they lack; without it, part
files left by a run that stopped are never overwritten: the command says how to continue instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from captioner.atomic import replaced_file, write_text_atomic
from captioner.errors import CaptionerError


def part_path(path: Path, rank: int, world_size: int) -> Path:
    suffix = ".partial" if world_size == 1 else f".rank{rank}-of-{world_size}.partial"
    return path.with_name(path.name + suffix)


def part_files(path: Path) -> list[Path]:
    """Every part file of ``path`` there is, from any run (one process or several)."""
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".") and p.name.endswith(".partial") and p.is_file())


def json_line(record: dict[str, Any]) -> str:
    """One record as a line of UTF-8 JSON; a file name that is not UTF-8 (Python holds its bytes as
    surrogate escapes) makes the line ASCII, its escapes ``\\udcff`` reading back as the same name."""
    line = json.dumps(record, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record)
    return line + "\n"


def read_records(files: list[Path]) -> dict[str, dict[str, Any]]:
    """source -> record, from JSON-lines files in order (the first record of a source wins). A
    line cut short by a crash, the last one of a part file, is not a record: its image is redone."""
    records: dict[str, dict[str, Any]] = {}
    for file in files:
        try:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("source"), str):
                records.setdefault(record["source"], record)
    return records


class JsonLinesOutput:
    """One process's part of ``--json FILE``. Creating it checks what is there; :meth:`open` (once
    every process has checked, under torchrun) starts the part file; both before any captioning."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        self.resume = resume
        self.partial = part_path(self.path, rank, world_size)
        for file in (self.path, self.partial):
            replaced_file(file)  # /dev/null, a folder, a pipe: refused before any captioning
        self.written = 0
        self.handle: Any = None
        left = [file for file in part_files(self.path) if file.stat().st_size > 0]
        if left and not resume:
            raise CaptionerError(
                f"{left[0]} holds captions from a run that stopped: pass --resume to caption only the images it lacks, or delete it"
            )
        #: The images earlier runs captioned (``--resume``): they are not captioned again.
        self.done: set[str] = set(read_records([self.path, *left])) if resume else set()

    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.partial, "a" if self.resume else "w", encoding="utf-8")
        except OSError as error:
            raise CaptionerError(f"cannot write --json {self.path}: {error.strerror or error}") from None
        if self.handle.tell() and not _ends_with_newline(self.partial):
            self.handle.write("\n")  # a line cut short by a crash stays a line of its own, skipped when read

    def write(self, records: list[dict[str, Any]]) -> None:
        self.handle.write("".join(json_line(record) for record in records))
        self.handle.flush()
        self.written += len(records)

    def close(self) -> None:
        self.handle.close()
        with open(self.partial, "rb") as handle:
            os.fsync(handle.fileno())

    def merge(self, sources: list[str]) -> int:
        """Write ``FILE``: every record of the part files (and, resuming, of the earlier ``FILE``), in
        the order of ``sources`` (records of other images after them, as they were), then remove the
        part files. Call once, in one process, after every process has closed its part. Returns the
        number of records written."""
        parts = part_files(self.path)
        records = read_records([self.path, *parts] if self.resume else parts)
        order = {source: index for index, source in enumerate(sources)}
        ranked = sorted(records.values(), key=lambda record: order.get(record["source"], len(order)))
        write_text_atomic(self.path, "".join(json_line(record) for record in ranked))
        for part in parts:
            part.unlink(missing_ok=True)
        return len(ranked)

    def abandon(self) -> str | None:
        """Close after a failure: a note on where the captions made so far are (None: there were none)."""
        if self.handle is None:
            return None
        self.handle.close()
        if not self.written:
            if self.partial.is_file() and self.partial.stat().st_size == 0:
                self.partial.unlink()
            return None
        return f"the {self.written} captions made before the run stopped are in {self.partial} (run again with --resume to go on)"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
