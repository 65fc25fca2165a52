"""One writer per folder: an OS lock that a second command on the same output folder runs into.

``captioner train``, ``prepare``, ``evaluate`` and ``ensemble`` hold :func:`exclusive_writer` on the
folder they write for as long as they write it. The lock is ``flock`` on a small file beside the
folder (``.NAME.lock``: the folder itself is swapped in and out by renames), holding the PID of the
process that has it, and removed when the writer is done. The kernel releases the lock when its
process ends, however it ends (a crash, a SIGKILL): a file left behind by a killed process is not a
lock, and the next writer takes it over. On NFS, Linux carries ``flock`` as a lock of the whole file
through the NFS lock protocol, as far as the server supports it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from captioner.errors import CaptionerError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows; there the folder is not locked
    fcntl = None  # type: ignore[assignment]


class FolderInUse(CaptionerError):
    """Another process is writing the folder."""


def lock_path(folder: str | os.PathLike) -> Path:
    absolute = Path(os.path.abspath(folder))
    return absolute.parent / f".{absolute.name}.lock"


@contextlib.contextmanager
def exclusive_writer(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of ``folder``, or raise :class:`FolderInUse` naming the process that holds it."""
    if fcntl is None:
        yield
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(path, folder)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: nobody can be holding this file
        handle.close()  # closing releases the lock


def _acquire(path: Path, folder: str | os.PathLike):  # type: ignore[no-untyped-def]
    """The lock file, open and locked. A writer that finishes removes its file: if the one we locked
    was removed meanwhile, lock the new one instead (two writers never hold different files)."""
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()[:20] or "unknown"
            handle.close()
            raise FolderInUse(
                f"{folder} is being written by another captioner process (PID {holder}); wait for it to finish or stop it, or choose another folder"
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return handle
        handle.close()
