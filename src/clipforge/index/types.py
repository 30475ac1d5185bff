"""Plain values and errors shared by the index modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.protocols import EncoderLike  # noqa: F401  (re-exported: the index's callers import it here)


class CollectionError(ValueError):
    """A collection folder is missing, malformed, or used in a way it does not allow."""


class WriteError(CollectionError):
    """Writing a collection (or an embedding folder) failed: disk full, read-only, no permission.

    Every batch committed before the failure stays stored and consistent; `committed` counts the items the
    failed call stored before it (None when not counted)."""

    def __init__(self, message: str, committed: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.committed = committed

    def __str__(self) -> str:
        if self.committed is None:
            return self.message
        return (
            f"{self.message}; {self.committed} items were committed before the failure and are stored "
            "(adding the same inputs again skips them)"
        )


class QueryError(ValueError):
    """A search that cannot be run as asked (k not a positive integer, ...)."""


def check_k(k: Any, what: str = "k") -> int:
    """`k` as an int >= 1, else QueryError. Searches then clamp it to what is stored."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"{what} must be a positive integer, got {k!r}")
    return int(k)


class ModelMismatchError(ValueError):
    """Vectors from one model were offered to a collection built with another."""


@dataclass
class Hit:
    """One stored item. `score` is the query score (sum of weighted cosines); 0.0 from `Collection.get`."""

    id: int
    score: float
    path: str | None
    caption: str | None
    metadata: dict
    sha256: str | None = None
    size: int | None = None
    mtime: float | None = None
    added: float | None = None
    relevance: float | None = None  # calibrated estimate in [0, 1] that the hit answers the query (query.py)


@dataclass
class AddReport:
    """What `Collection.add` did with each path it met."""

    added: list[str] = field(default_factory=list)  # new paths, now stored
    updated: list[str] = field(default_factory=list)  # known paths whose content changed: old row replaced
    unchanged: list[str] = field(default_factory=list)  # known paths with the same content hash: skipped
    skipped: list[str] = field(default_factory=list)  # files met in folders without an image extension
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable or bad images
    ids: list[int] = field(default_factory=list)  # ids of the rows written
    removed: list[str] = field(default_factory=list)  # keys whose files were gone (`sync`): rows removed

    def summary(self) -> str:
        return (
            f"added {len(self.added)}, updated {len(self.updated)}, unchanged {len(self.unchanged)},"
            f" skipped {len(self.skipped)}, failed {len(self.failed)}"
        )


def identity_name(identity: dict) -> str:
    return (
        f"{identity.get('model', '?')} ({identity.get('fingerprint', '?')}, dim {identity.get('dim', '?')})"
    )


def same_model(a: dict, b: dict) -> bool:
    return a.get("fingerprint") == b.get("fingerprint") and int(a.get("dim", -1)) == int(b.get("dim", -2))


def check_identity(collection_identity: dict, encoder: EncoderLike, where: Path | str) -> None:
    ident = dict(getattr(encoder, "identity", None) or {})
    ident.setdefault("dim", getattr(encoder, "dim", None))
    if not same_model(collection_identity, ident):
        raise ModelMismatchError(
            f"collection {where} was built with {identity_name(collection_identity)}, "
            f"but the encoder is {identity_name(ident)}; use the same model or a new collection"
        )
