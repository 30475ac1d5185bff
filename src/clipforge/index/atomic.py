"""Whole-file writes: a crash leaves the old file or the new one, a failed write (full disk, read-only folder)
leaves no temp file behind and raises WriteError naming the file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .types import WriteError

TMP_SUFFIX = ".tmp"  # a file ending so is a write in progress, or the leftover of a killed one


def write_atomic(
    path: Path, write: Callable[[BinaryIO], object], before_replace: Callable[[], None] | None = None
) -> None:
    """Write `path` through a temp file beside it: `write(f)`, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()  # test hook: a crash between a complete temp file and the rename
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)


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
