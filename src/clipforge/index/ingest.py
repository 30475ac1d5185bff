"""Every way into a collection, for the CLI, the Python API (`Collection.add`) and the service alike.

`add_inputs` routes each input by the one reader's `data.sources.source_kind`: an embedding folder
(`clipforge embed` output) is stored as it is, manifests (JSONL/CSV/TSV) and webdataset shards (files,
folders of .tar, brace patterns, URLs) go through the bulk pipeline (bulk.py), image files and folders are
hashed, decoded and embedded here, videos met among them become one row per sampled frame (videos.py), and
captions become text rows. Which items are new, changed or unchanged is
decided in one place, changes.py. `sync` makes a folder's rows match the folder. Each batch is one committed
transaction (store.py), so a killed add or sync leaves whole batches, and running it again finishes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipforge.data.sources import SourceError, source_kind
from clipforge.data.tars import is_remote
from clipforge.media.exif import row_metadata
from clipforge.media.video import Sampling

from . import bulk, files
from .arrays import as_matrix
from .changes import commit_replacing, is_unchanged, stored_rows
from .store import Store
from .types import AddReport, EncoderLike
from .videos import add_videos

TEXT_BATCH = 256
BULK_KINDS = ("manifest", "shards")


@dataclass(frozen=True)
class Pipeline:
    """How image files are read and embedded: images per model call, decode processes (None: cores - 1;
    0: in this process), full-size JPEG decoding, a progress bar; and how videos are sampled (seconds
    between frames, frames per video; None: media/video.py's defaults, and stored videos keep their
    sampling, see videos.py)."""

    batch_size: int = 64
    workers: int | None = None
    exact_decode: bool = False
    progress: bool = False
    video_interval: float | None = None
    video_max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        _ = self.video_sampling  # a SamplingError now, before anything is read

    @property
    def video_sampling(self) -> Sampling | None:
        """The sampling asked for, the defaults filling what was not given; None when nothing was."""
        if self.video_interval is None and self.video_max_frames is None:
            return None
        return Sampling.of(self.video_interval, self.video_max_frames)


def merge(into: AddReport, part: AddReport) -> None:
    for name in ("added", "updated", "unchanged", "skipped", "failed", "ids", "removed"):
        getattr(into, name).extend(getattr(part, name))


def input_kind(path: str | Path) -> str:
    """`source_kind` of an input: "embeddings", "manifest", "shards", "folder" or "image". What the reader
    cannot name (a missing path, a file of another type) counts as an image, so that `add_files` tries it and
    reports why it failed instead of aborting the whole add."""
    try:
        return source_kind(path)
    except SourceError:
        return "image"


def remote_inputs(inputs: Sequence[str | Path]) -> list[str]:
    """The inputs that are URLs or `pipe:` commands rather than local paths: streamed as shards, so a caller
    that must only open local files (the service) refuses them."""
    return [str(p) for p in inputs if is_remote(str(p))]


def needs_encoder(inputs: Sequence[str | Path]) -> bool:
    """Whether adding `inputs` runs the model (everything but embedding folders does)."""
    return any(input_kind(p) != "embeddings" for p in inputs)


def add_inputs(
    store: Store,
    inputs: Sequence[str | Path],
    encoder: EncoderLike | None,
    pipeline: Pipeline = Pipeline(),
) -> AddReport:
    """Add any mix of image files, folders, manifests, shards and embedding folders (see the module)."""
    store.check_writable()
    kinds = {str(p): input_kind(p) for p in inputs}
    folders = [p for p, k in kinds.items() if k == "embeddings"]
    batch = [p for p, k in kinds.items() if k in BULK_KINDS]
    images = [p for p, k in kinds.items() if k not in BULK_KINDS and k != "embeddings"]
    report = AddReport()
    with store.counting_commits():
        for f in folders:
            merge(report, bulk.add_embedding_folder(store, f))
        if images or batch:
            encoder = _checked(store, encoder)
        if images:
            merge(report, add_files(store, images, encoder, pipeline))
        if batch:
            p = pipeline
            merge(
                report,
                bulk.add_sources(
                    store,
                    batch,
                    encoder,
                    batch_size=p.batch_size,
                    workers=p.workers,
                    exact_decode=p.exact_decode,
                    progress=p.progress,
                ),
            )
    return report


def _checked(store: Store, encoder: EncoderLike | None) -> EncoderLike:
    if encoder is None:
        raise ValueError("adding images, manifests or shards needs encoder= (the collection's model)")
    store.check_encoder(encoder)
    return encoder


def add_files(
    store: Store, items: Iterable[str | Path], encoder: EncoderLike, pipeline: Pipeline = Pipeline()
) -> AddReport:
    """Image and video files and folders (recursively). A clipforge `Encoder` decodes images in worker
    processes (embed.py); any other encoder gets decoded PIL images in this process. Videos are decoded here,
    a few frames at a time (videos.py)."""
    encoder = _checked(store, encoder)
    report = AddReport()
    todo = _walk(items, report)
    images = [p for p in todo if not files.is_video(p)]
    with store.counting_commits():
        if images and uses_pipeline(encoder):
            from .embed import default_workers

            w = default_workers() if pipeline.workers is None else pipeline.workers
            _add_files_parallel(store, images, encoder, pipeline, w, report)
        elif images:
            _add_files_here(store, images, encoder, pipeline, report)
        add_videos(store, [p for p in todo if files.is_video(p)], encoder, report, pipeline.video_sampling)
    return report


def _walk(items: Iterable[str | Path], report: AddReport) -> list[str]:
    """The files to try, once each; missing paths and files that are neither images nor videos go to
    `report`."""
    todo, seen = [], set()
    for path, reason in files.walk(items):
        if path in seen:
            continue
        seen.add(path)
        if reason is None:
            todo.append(path)
        elif reason == "missing":
            report.failed.append((path, "file not found"))
        else:
            report.skipped.append(path)
    return todo


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


def _flush(store: Store, pending: list, encoder: EncoderLike, report: AddReport) -> None:
    embedded = _embed_isolating_failures(encoder, [p[1] for p in pending], store.dim)
    vecs, records, old_ids = [], [], []
    for (entry, _, old), v in zip(pending, embedded):
        if isinstance(v, str):
            report.failed.append((entry.path, v))
            continue
        vecs.append(v)
        meta = row_metadata(entry.data, entry.path)  # EXIF: taken_at, camera, gps, orientation
        rec = {"path": entry.path, "sha256": entry.sha256, "size": entry.size, "mtime": entry.mtime}
        records.append({**rec, "metadata": meta})
        old_ids.append(old)
    if vecs:
        commit_replacing(store, np.stack(vecs), records, old_ids, report)


def _add_files_here(
    store: Store, todo: list[str], encoder: EncoderLike, pipeline: Pipeline, report: AddReport
) -> None:
    pending: list = []  # (FileEntry, decoded image, ids of the rows it replaces)
    if pipeline.progress:
        from tqdm import tqdm

        todo = tqdm(todo, unit="file", desc="add")
    for path in todo:
        try:
            entry = files.read(path)
        except OSError as e:
            report.failed.append((path, f"cannot read: {e.strerror or e}"))
            continue
        old = stored_rows(store, path)
        if is_unchanged(old, entry.sha256):
            report.unchanged.append(path)
            continue
        try:
            image = files.decode(entry)
        except Exception as e:  # noqa: BLE001 - ImageError, or whatever a codec raises: reported per file
            report.failed.append((path, files.failure_reason(e, path)))
            continue
        pending.append((entry, image, [i for i, _ in old]))
        if len(pending) >= pipeline.batch_size:
            _flush(store, pending, encoder, report)
            pending = []
    if pending:
        _flush(store, pending, encoder, report)


def uses_pipeline(encoder: EncoderLike) -> bool:
    """A real clipforge Encoder (preprocessing + pixel entry point) can decode in worker processes."""
    return hasattr(encoder, "preprocess") and hasattr(encoder, "embed_pixels")


def _add_files_parallel(
    store: Store, paths: list[str], encoder: EncoderLike, pipeline: Pipeline, workers: int, report: AddReport
) -> None:
    """`_add_files_here` with hashing, decoding and preprocessing in worker processes (embed.py), the model
    in this one. Same semantics: unchanged files (same path and sha256) are hashed but not decoded."""
    from .embed import UNCHANGED, bulk_preprocess, chunks, decode_batches
    from .sources import Item

    todo = [Item(p, p) for p in paths]
    known = {it.key: rows for it in todo if (rows := stored_rows(store, it.key))}
    # A path whose rows all carry the file's current hash is unchanged; the workers check that after hashing.
    same = {k: {rows[0][1]} for k, rows in known.items() if len({sha for _, sha in rows}) == 1}
    batches = chunks(todo, pipeline.batch_size)
    workers = min(workers, len(batches))  # a handful of files is not worth a process each
    prep = bulk_preprocess(encoder.preprocess, pipeline.exact_decode)
    bar = None
    if pipeline.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="add")
    for batch, dec in zip(batches, decode_batches(batches, prep, workers, same)):
        vecs = encoder.embed_pixels(dec.pixels) if dec.ok else np.zeros((0, store.dim), np.float32)
        records, old_ids = [], []
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
                old_ids.append([i for i, _ in known.get(it.key, [])])
        commit_replacing(store, vecs, records, old_ids, report)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()


def add_captions(
    store: Store, texts: list[str], encoder: EncoderLike, metadata: dict | list[dict] | None = None
) -> list[int]:
    """Rows with a caption and no image; returns one id per text (the existing row's for a known caption)."""
    encoder = _checked(store, encoder)
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
        found = store.caption_id(sha)
        ids.append(found)
        if found is None:
            todo.setdefault(sha, i)
    order = sorted(todo.values())
    with store.counting_commits():
        for start in range(0, len(order), TEXT_BATCH):
            pos = order[start : start + TEXT_BATCH]
            vecs = encoder.embed_texts([texts[p] for p in pos])
            records = [
                {"caption": texts[p], "sha256": files.text_sha(texts[p]), "metadata": metas[p]} for p in pos
            ]
            for p, n in zip(pos, store.add_vectors(vecs, records)):
                ids[p] = n
    by_sha = {files.text_sha(texts[p]): ids[p] for p in order}
    return [i if i is not None else by_sha[files.text_sha(t)] for i, t in zip(ids, texts)]


def sync(
    store: Store, folder: str | Path, encoder: EncoderLike, pipeline: Pipeline = Pipeline()
) -> AddReport:
    """Make the rows under `folder` match it: rows whose files are gone are removed (one transaction), then
    new and changed files are added (unchanged ones skipped). A crash at any point leaves whole transactions;
    running sync again completes it."""
    encoder = _checked(store, encoder)
    root = files.normalise(folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"sync needs a folder; {folder} is not one")
    report = AddReport()
    with store.counting_commits():
        # a frame's key is `VIDEO#t=SECONDS`: it is gone when its video is
        backing = {key: files.backing_file(key) for key in store.keys_under(root)}
        gone = [key for key, file in backing.items() if not os.path.isfile(file)]
        if gone:
            store.remove(gone)
            report.removed += sorted({backing[key] for key in gone})
        merge(report, add_files(store, [root], encoder, pipeline))
    return report
