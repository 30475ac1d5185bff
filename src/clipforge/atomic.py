"""Whole-file writes for every layer: a crash leaves the old file or the new one, never half of either, and a
failed write (full disk, read-only folder) leaves no temp file behind and names the file it could not write.

The temp file sits beside the target (a rename is atomic only within one file system) under a name unique to
the writer, so concurrent writers of one target (two server processes making the same thumbnail) never
clobber each other's temp file; the last rename wins, and every version renamed in is whole.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"  # a file ending so is a write in progress, or the leftover of a killed one


class AtomicWriteError(OSError):
    """A whole-file write failed; the target is as it was before."""


def temp_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this write, ending in `path`'s own name and TMP_SUFFIX."""
    return path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, durable: bool = True, error: Callable[[str], Exception] = AtomicWriteError
) -> Iterator[Path]:
    """Yield a temp path to write `path`'s new content to (for writers that want a file name); when the block
    ends cleanly it replaces `path`. `durable`: fsync the file and the folder, so the new content survives a
    power cut (a cache that can be remade may skip it). A failure raises `error(message)`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, AtomicWriteError):
            raise error(f"cannot write {path}: {e.strerror or e}") from e
        raise
    if durable:
        _fsync_dir(path.parent)


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    *,
    durable: bool = True,
    error: Callable[[str], Exception] = AtomicWriteError,
) -> None:
    """Write `path` through a temp file: `write(f)` on the open binary file, then as `atomic_path`."""
    with atomic_path(path, durable=durable, error=error) as tmp, open(tmp, "wb") as f:
        write(f)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    write_atomic(path, lambda f: f.write(data), durable=durable)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename has happened either way
    finally:
        os.close(fd)
