"""The one place that decides, for items about to be stored, which are new, changed or unchanged.

A key (a file's normalised path, or an image_path of an embedding folder) whose stored rows all carry the
item's sha256 is unchanged and skipped; a key with other rows is changed: its old rows are dropped in the same
transaction that stores the new one, so a search never sees both or neither.
"""

from __future__ import annotations

import numpy as np

from .arrays import as_matrix, unit
from .store import Store
from .types import AddReport


def stored_rows(store: Store, key: str) -> list[tuple[int, str | None]]:
    return store.lookup(key)


def is_unchanged(rows: list[tuple[int, str | None]], sha256: str | None) -> bool:
    return bool(rows) and all(sha == sha256 for _, sha in rows)


def commit_replacing(
    store: Store, vectors: np.ndarray, records: list[dict], old_ids: list[list[int]], report: AddReport
) -> None:
    """Store `records` with `vectors` (N, D; normalised here), dropping each record's `old_ids` in the same
    transaction, and note each key in `report` as added or updated."""
    if not records:
        return
    x = unit(as_matrix(vectors, store.dim, "vectors"))
    report.ids += store.commit(x, records, [i for old in old_ids for i in old])
    for rec, old in zip(records, old_ids):
        (report.updated if old else report.added).append(rec.get("path", rec.get("key")))


def commit_changed(store: Store, vectors: np.ndarray, records: list[dict], report: AddReport) -> None:
    """`commit_replacing` for the records whose key is new or whose sha256 differs from the stored rows';
    the unchanged ones are only noted in `report`."""
    keep, old_ids = [], []
    for i, rec in enumerate(records):
        key = rec.get("path", rec.get("key"))
        rows = stored_rows(store, key)
        if is_unchanged(rows, rec.get("sha256")):
            report.unchanged.append(key)
            continue
        keep.append(i)
        old_ids.append([rid for rid, _ in rows])
    if keep:
        commit_replacing(store, np.asarray(vectors)[keep], [records[i] for i in keep], old_ids, report)
