"""The collection folder itself: its config file, its writer lock, its snapshots and what a killed writer
left behind. See store.py for the layout."""

from __future__ import annotations

import contextlib
import importlib
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from clipforge.atomic import TMP_SUFFIX, write_atomic

from .types import CollectionError, WriteError

SCRATCH = "scratch"
CONFIG = "collection.json"


def version() -> str:
    try:
        return str(getattr(importlib.import_module("clipforge"), "__version__", "0.1.0"))
    except ImportError:
        return "0.1.0"


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """A failed write under `path` (full disk, read-only folder or file, no permission) -> WriteError."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, sqlite3.OperationalError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise WriteError(f"cannot write collection {path} ({what}): {reason}") from e


def write_config(path: Path, config: dict) -> None:
    write_atomic(
        path / CONFIG,
        lambda f: f.write(json.dumps(config, indent=2, sort_keys=True).encode()),
        error=WriteError,
    )


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise CollectionError(f"no collection at {path}: {CONFIG} is missing") from None
    except json.JSONDecodeError as e:
        raise CollectionError(f"{path / CONFIG} is not valid JSON: {e}") from None
    missing = {"model", "dim", "index"} - set(config)
    if missing or not (path / "items.sqlite").exists():
        raise CollectionError(
            f"{path} is not a complete collection (missing {sorted(missing) or 'items.sqlite'})"
        )
    return config


def take_lock(path: Path) -> IO:
    """The writer lock (an advisory lock on writer.lock), held while the returned file is open."""
    try:
        lock = open(path / "writer.lock", "a+")
    except OSError as e:
        raise WriteError(
            f"cannot open collection {path} for writing: {e.strerror or e}; open it readonly=True to search it"
        ) from e
    try:
        import fcntl

        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no advisory locks on this platform: one writer at a time is then the user's job
    except OSError:
        lock.close()
        raise CollectionError(
            f"{path} is open for writing in another process; open it readonly=True"
        ) from None
    return lock


def remove_leftovers(path: Path) -> None:
    """Temp files of writes a killed writer never finished, and its scratch folder. The caller holds the
    writer lock, so nobody else is writing them."""
    for p in path.glob("*" + TMP_SUFFIX):
        with contextlib.suppress(OSError):
            p.unlink()
    shutil.rmtree(path / SCRATCH, ignore_errors=True)


def snapshots(path: Path) -> list[tuple[int, str, Path]]:
    """(generation, kind, file) of each index snapshot, newest first."""
    out = []
    for p in path.glob("index.*.faiss"):
        parts = p.name.split(".")
        if len(parts) == 4 and parts[2].isdigit():
            out.append((int(parts[2]), parts[1], p))
    return sorted(out, reverse=True)
