"""Atomic file and folder writes: a crash leaves the old version or the new one, never half of one.

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target (``os.replace`` is atomic on POSIX and Windows). Folders (checkpoints, prepared datasets)
are built under a temporary name beside the target and swapped in with renames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from captioner.errors import CaptionerError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask briefly changes process state, unsafe in threads


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replaced_file(path: str | os.PathLike) -> Path:
    """The file a write to ``path`` replaces: ``path``, or the file it links to (the link stays).
    Anything but a regular file there (a device such as /dev/null, a folder, a pipe) is refused in
    one line: renaming a new file over it would destroy it."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not target.is_file():
        raise CaptionerError(f"{path} is not a regular file (a device, a folder or a pipe): a write would replace it, so captioner will not write there")
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(temp_path)`` to produce the file, then move it to ``path`` (or the file ``path``
    links to) in one step."""
    path = replaced_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda temp: temp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def check_replaceable(target: str | os.PathLike, *, overwrite: bool, marker: str, what: str) -> None:
    """Refuse to replace a non-empty folder ``target`` unless ``overwrite`` is set and it is one of ours.

    A folder is ours (a prepared dataset, a checkpoint, a run) when it holds the file ``marker``
    that we write into every such folder. Anything else (the user's images, a home folder given as
    ``--out`` by mistake) is never deleted, ``--overwrite`` or not.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CaptionerError(f"{target} exists and is not a folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise CaptionerError(f"{target} already exists; pass --overwrite to replace it")
    if not (target / marker).is_file():
        raise CaptionerError(f"{target} is not {what} (it has no {marker}): refusing to replace it; remove it yourself or choose another folder")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool, marker: str, what: str) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``target``.

    An existing non-empty ``target`` is refused up front with a clear error, unless ``overwrite``
    is set and it holds ``marker`` (see :func:`check_replaceable`); then the old folder is kept
    until the new one is complete, and swapped out. On any failure the temporary folder is removed
    and ``target`` is untouched.
    """
    target = Path(target)
    recover_directory(target, marker=marker)
    check_replaceable(target, overwrite=overwrite, marker=marker, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    try:
        os.chmod(building, 0o777 & ~_UMASK)
        yield building
        for file in building.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~_UMASK)  # some writers (safetensors) create files 0600
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        replace_directory(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def recover_directory(target: str | os.PathLike, *, marker: str) -> bool:
    """Put back the previous version of ``target`` if a crash between the two renames of
    :func:`replace_directory` left it only as ``.NAME.old-PID``; True if one was put back.

    Only a complete folder (one holding ``marker``) is put back, the newest if there are several.
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return False
    leftovers = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    complete = [path for path in leftovers if (path / marker).is_file()]
    if not complete:
        return False
    try:
        os.replace(complete[-1], target)
    except OSError:  # another process put it back first, or the folder is read-only: leave it
        return False
    _fsync_directory(target.parent)
    return True


def replace_directory(source: Path, target: Path) -> None:
    """Move folder ``source`` to ``target``, replacing any folder there, via two renames.

    A crash between them leaves the previous folder as ``.NAME.old-PID``: readers call
    :func:`recover_directory` to put it back.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(source, target)
    _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
