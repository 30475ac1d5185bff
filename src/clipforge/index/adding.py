"""The file-walking side of `Collection.add` and `Collection.add_texts`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipforge.media.exif import row_metadata

from . import files
from .search import as_matrix
from .types import AddReport, EncoderLike

if TYPE_CHECKING:
    from .store import Collection

TEXT_BATCH = 256


def _embed_isolating_failures(encoder: EncoderLike, images: list, dim: int) -> list[np.ndarray | str]:
    """Embed a batch; if the encoder rejects it, retry one by one so one bad image fails alone.

    Returns, per image, its vector (D,) or the reason it failed.
    """
    try:
        out = as_matrix(encoder.embed_images(images), dim, "encoder output")
        if len(out) == len(images):
            return list(out)
    except Exception:  # noqa: BLE001 - any encoder failure is isolated per image below
        pass
    result: list[np.ndarray | str] = []
    for im in images:
        try:
            result.append(as_matrix(encoder.embed_images([im]), dim, "encoder output")[0])
        except Exception as e:  # noqa: BLE001 - reported per file, never aborts the batch
            result.append(f"encoder failed: {type(e).__name__}: {e}")
    return result


def _flush(coll: Collection, pending: list, encoder: EncoderLike, report: AddReport) -> None:
    embedded = _embed_isolating_failures(encoder, [p[1] for p in pending], coll.dim)
    vecs, records, drop, kept = [], [], [], []
    for (entry, _, old_ids), v in zip(pending, embedded):
        if isinstance(v, str):
            report.failed.append((entry.path, v))
            continue
        vecs.append(v)
        meta = row_metadata(entry.data, entry.path)  # EXIF: taken_at, camera, gps, orientation
        rec = {"path": entry.path, "sha256": entry.sha256, "size": entry.size, "mtime": entry.mtime}
        records.append({**rec, "metadata": meta})
        drop += old_ids
        kept.append((entry.path, bool(old_ids)))
    if not vecs:
        return
    x = np.stack(vecs)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    report.ids += coll._commit(x, records, drop)
    for path, replaced in kept:
        (report.updated if replaced else report.added).append(path)


def add_files(
    coll: Collection, items: Iterable[str | Path], encoder: EncoderLike, batch_size: int, progress: bool
) -> AddReport:
    report = AddReport()
    pending: list = []  # (FileEntry, decoded image, ids of the rows it replaces)
    seen: set[str] = set()
    walker = files.walk(items)
    if progress:
        from tqdm import tqdm

        walker = tqdm(walker, unit="file", desc="add")
    for path, reason in walker:
        if path in seen:
            continue
        seen.add(path)
        if reason == "missing":
            report.failed.append((path, "file not found"))
            continue
        if reason is not None:
            report.skipped.append(path)
            continue
        try:
            entry = files.read(path)
        except OSError as e:
            report.failed.append((path, f"cannot read: {e.strerror or e}"))
            continue
        old = coll.conn.execute("SELECT id, sha256 FROM items WHERE key=?", (path,)).fetchall()
        if old and all(sha == entry.sha256 for _, sha in old):
            report.unchanged.append(path)
            continue
        try:
            image = files.decode(entry)
        except Exception as e:  # noqa: BLE001 - ImageError, or whatever a codec raises: reported per file
            report.failed.append((path, files.failure_reason(e, path)))
            continue
        pending.append((entry, image, [i for i, _ in old]))
        if len(pending) >= batch_size:
            _flush(coll, pending, encoder, report)
            pending = []
    if pending:
        _flush(coll, pending, encoder, report)
    return report


def uses_pipeline(encoder: EncoderLike) -> bool:
    """A real clipforge Encoder (preprocessing + pixel entry point) can decode in worker processes."""
    return hasattr(encoder, "preprocess") and hasattr(encoder, "embed_pixels")


def add_files_parallel(
    coll: Collection,
    items: Iterable[str | Path],
    encoder: EncoderLike,
    batch_size: int,
    progress: bool,
    workers: int,
    exact_decode: bool,
) -> AddReport:
    """`add_files` with hashing, decoding and preprocessing in worker processes (embed.py), the model in this
    one. Same semantics: one committed transaction per batch, unchanged files (same path and sha256) are
    hashed but not decoded, changed ones replace their old rows."""
    from .embed import UNCHANGED, bulk_preprocess, chunks, decode_batches
    from .sources import Item

    report, todo, seen = AddReport(), [], set()
    for path, reason in files.walk(items):
        if path in seen:
            continue
        seen.add(path)
        if reason is None:
            todo.append(Item(path, path))
        elif reason == "missing":
            report.failed.append((path, "file not found"))
        else:
            report.skipped.append(path)
    known: dict[str, list[tuple[int, str]]] = {}
    for it in todo:
        rows = coll.conn.execute("SELECT id, sha256 FROM items WHERE key=?", (it.key,)).fetchall()
        if rows:
            known[it.key] = rows
    # A path whose rows all carry the file's current hash is unchanged; the workers check that after hashing.
    same = {k: {rows[0][1]} for k, rows in known.items() if len({sha for _, sha in rows}) == 1}
    batches = chunks(todo, batch_size)
    workers = min(workers, len(batches))  # a handful of files is not worth a process each
    prep = bulk_preprocess(encoder.preprocess, exact_decode)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="add")
    for batch, dec in zip(batches, decode_batches(batches, prep, workers, same)):
        vecs = encoder.embed_pixels(dec.pixels) if dec.ok else np.zeros((0, coll.dim), np.float32)
        records, drop, kept = [], [], []
        for it, status, sha, size, mtime in zip(batch, dec.status, dec.sha256, dec.size, dec.mtime):
            if status == UNCHANGED:
                report.unchanged.append(it.key)
            elif status is not None:
                report.failed.append((it.key, status))
            else:
                meta = row_metadata(it.key)  # EXIF, from the header only
                records.append(
                    {"path": it.key, "sha256": sha, "size": size, "mtime": mtime, "metadata": meta}
                )
                old = [i for i, _ in known.get(it.key, [])]
                drop += old
                kept.append((it.key, bool(old)))
        if records:
            x = as_matrix(vecs, coll.dim, "encoder output")
            report.ids += coll._commit(
                x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), records, drop
            )
            for path, replaced in kept:
                (report.updated if replaced else report.added).append(path)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return report


def add_captions(
    coll: Collection, texts: list[str], encoder: EncoderLike, metadata: dict | list[dict] | None
) -> list[int]:
    """Rows with a caption and no image; returns one id per text (the existing row's for a known caption)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"text {i} must be a non-empty string, got {t!r}")
    metas = metadata if isinstance(metadata, list) else [metadata or {}] * len(texts)
    if len(metas) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(metas)} metadata dicts")
    ids: list[int | None] = []
    todo: dict[str, int] = {}  # sha -> first position needing a new row
    for i, t in enumerate(texts):
        sha = files.text_sha(t)
        row = coll.conn.execute("SELECT id FROM items WHERE key IS NULL AND sha256=?", (sha,)).fetchone()
        ids.append(row[0] if row else None)
        if row is None:
            todo.setdefault(sha, i)
    order = sorted(todo.values())
    for start in range(0, len(order), TEXT_BATCH):
        pos = order[start : start + TEXT_BATCH]
        vecs = encoder.embed_texts([texts[p] for p in pos])
        records = [
            {"caption": texts[p], "sha256": files.text_sha(texts[p]), "metadata": metas[p]} for p in pos
        ]
        new = coll.add_vectors(vecs, records)
        for p, n in zip(pos, new):
            ids[p] = n
    by_sha = {files.text_sha(texts[p]): ids[p] for p in order}
    return [i if i is not None else by_sha[files.text_sha(t)] for i, t in zip(ids, texts)]
