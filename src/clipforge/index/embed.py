"""The bulk embedding pipeline: reader -> decode in worker processes -> batched inference -> ordered writer.

    items (sources.py) -> batches -> DataLoader workers: read bytes, sha256, decode (JPEG draft), preprocess
                       -> main process: Encoder.embed_pixels on each batch, in input order
                       -> numbered parts with done-markers (embed_output.py), or Collection commits (ingest.py)

Decoding a large JPEG costs more than a ViT-B forward pass on a GPU, so decoding runs in parallel processes
(each with one torch thread) while the main process runs the model, and JPEGs decode at 1/2, 1/4 or 1/8 scale
when the result still covers the model's input (`fast_jpeg`; `exact_decode=True` turns it off). Workers never
fail a batch: an unreadable image is reported with its reason and the rest go on. A video is one item per
sampled moment (sources.py); a worker decodes just that frame (media/video.py), never the file's bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.data.pretrained import sha256_file
from clipforge.media.video import Sampling, frame_at
from clipforge.transforms import Preprocess, load_image

from . import embed_output as eo
from .files import failure_reason
from .sources import Item, SourceError, list_items

DEFAULT_PART_SIZE = 100_000
UNCHANGED = "unchanged"  # status of an item whose content hash is already stored (Collection.add)


def default_workers() -> int:
    """Decode processes: all cores but the one the model runs on, at most 16 (beyond that the GPU waits)."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def bulk_preprocess(preprocess: Preprocess, exact_decode: bool) -> Preprocess:
    """The encoder's preprocessing with the fast JPEG path switched on (unless `exact_decode`)."""
    if preprocess.config.fast_jpeg == (not exact_decode):
        return preprocess
    return Preprocess(dataclasses.replace(preprocess.config, fast_jpeg=not exact_decode))


@dataclass
class Decoded:
    """One batch after decoding. Per position: status None (decoded), UNCHANGED, or a failure reason."""

    pixels: torch.Tensor  # (n_ok, 3, S, S) for the positions whose status is None, in order
    status: list[str | None]
    sha256: list[str | None]
    size: list[int | None]
    mtime: list[float | None]

    @property
    def ok(self) -> list[int]:
        return [i for i, s in enumerate(self.status) if s is None]


class _Batches(torch.utils.data.Dataset):
    """Dataset whose element i is the whole decoded batch i (the DataLoader runs with batch_size=None)."""

    def __init__(
        self, batches: Sequence[Sequence[Item]], preprocess: Preprocess, known: dict[str, set[str]] | None
    ) -> None:
        self.batches = batches
        self.preprocess = preprocess
        self.known = known or {}  # key -> sha256s already stored: those files are hashed, not decoded

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Decoded:
        tensors, out = [], Decoded(torch.empty(0), [], [], [], [])
        for item in self.batches[i]:
            x, status, sha, size, mtime = decode_item(item, self.preprocess, self.known.get(item.key, ()))
            if x is not None:
                tensors.append(x)
            for lst, v in zip((out.status, out.sha256, out.size, out.mtime), (status, sha, size, mtime)):
                lst.append(v)
        size = self.preprocess.config.image_size
        out.pixels = torch.stack(tensors) if tensors else torch.zeros(0, 3, size, size)
        return out


def decode_item(
    item: Item, preprocess: Preprocess, known_sha: Collection[str] = ()
) -> tuple[torch.Tensor | None, str | None, str | None, int | None, float | None]:
    """Read, hash, decode and preprocess one item -> (pixels (3, S, S) or None, status, sha256, size, mtime).

    status is None when decoded, UNCHANGED when its sha256 is in `known_sha` (then not decoded), else why it
    failed. Never raises for a bad file."""
    if item.failed is not None:
        return None, item.failed, None, None, None
    if item.t is not None:
        return _decode_moment(item, preprocess)
    status, sha, size, mtime, x = None, None, None, None, None
    try:
        data = item.read()
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
        mtime = os.stat(item.path).st_mtime if item.length < 0 else None
        if sha in known_sha:
            status = UNCHANGED
        elif not data:
            status = "empty file (0 bytes)"
        else:
            cfg = preprocess.config
            draft = cfg.image_size if cfg.fast_jpeg else None
            x = preprocess(load_image(data, draft_size=draft, name=item.key))
    except Exception as e:  # noqa: BLE001 - ImageError and whatever else a codec raises: reported per file
        status = failure_reason(e, item.key)
    return x, status, sha, size, mtime


def _decode_moment(
    item: Item, preprocess: Preprocess
) -> tuple[torch.Tensor | None, str | None, str | None, int | None, float | None]:
    """`decode_item` of a video's moment: its frame; sha256, size and mtime are the whole video's, as a
    collection's frame rows carry them. A feature cache holds images, never moments: always decoded."""
    try:
        st = os.stat(item.path)
        sha = _video_sha256(item.path, st.st_size, st.st_mtime_ns)
        return preprocess(frame_at(item.path, item.t)), None, sha, st.st_size, st.st_mtime
    except Exception as e:  # noqa: BLE001 - ImageError, or whatever FFmpeg raises: reported per moment
        return None, failure_reason(e, item.path), None, None, None


@functools.lru_cache(maxsize=4)
def _video_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A video is hashed once per worker, not once per moment (size and mtime key the cache, so a file
    rewritten meanwhile is hashed again)."""
    return sha256_file(Path(path))


def _identity(x):
    return x


def decode_batches(
    batches: Sequence[Sequence[Item]],
    preprocess: Preprocess,
    workers: int,
    known: dict[str, set[str]] | None = None,
) -> Iterator[Decoded]:
    """Decode each batch in `workers` processes (0: in this one), yielding them in order."""
    loader = torch.utils.data.DataLoader(
        _Batches(batches, preprocess, known),
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
    )
    yield from loader


def chunks(seq: Sequence, n: int) -> list[Sequence]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


def _check(batch_size: int, part_size: int, dtype: str) -> None:
    if batch_size <= 0 or part_size <= 0:
        raise ValueError(f"batch_size and part_size must be positive, got {batch_size} and {part_size}")
    if dtype not in eo.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(eo.DTYPES)}, got {dtype!r}")


def plan(
    inputs,
    identity: dict,
    dim: int,
    out: Path,
    part_size: int,
    dtype: str,
    exact_decode: bool,
    sampling: Sampling = Sampling(),
) -> tuple[list[Item], list[list[Item]], set[int]]:
    """List the input, cut it into parts, write or check the sidecar; returns items, parts, finished parts.
    (A video's moments are keys of the input fingerprint: another sampling is another run.)"""
    items = list_items(inputs, sampling)
    if not items:
        raise SourceError(f"no images found in {inputs}")
    parts = [list(p) for p in chunks(items, part_size)]
    header = {
        "format": eo.FORMAT,
        "model": identity,
        "dim": int(dim),
        "dtype": dtype,
        "part_size": part_size,
        "parts": len(parts),
        "count": len(items),
        "captions": all(it.caption for it in items),
        "input": eo.input_fingerprint([it.key for it in items], part_size),
        "exact_decode": exact_decode,
    }
    return items, parts, eo.prepare(out, header)


def metadata_row(item: Item, sha: str | None) -> dict:
    reserved = {"image_path", "caption", "sha256"}
    return {
        "image_path": item.key,
        "caption": item.caption,
        "sha256": sha,
        **{k: v for k, v in item.metadata.items() if k not in reserved},
    }


class PartAssembler:
    """Collects per-item results of the parts in flight and writes each part once all its items are in."""

    def __init__(
        self, out: Path, parts: list[list[Item]], todo: list[int], captions: bool, dtype: str, embed_texts
    ):
        self.out, self.parts, self.captions, self.dtype = out, parts, captions, dtype
        self.embed_texts = embed_texts  # list[str] -> (n, D); None when captions are not embedded
        self.pending = {p: {"vecs": [], "txt": [], "rows": [], "skipped": [], "seen": 0} for p in todo}
        self.skipped: list[tuple[str, str]] = []
        self.embedded = 0

    def add(
        self,
        part: int,
        item: Item,
        vector: np.ndarray | None,
        sha: str | None,
        reason: str | None,
        text_vector: np.ndarray | None = None,
    ) -> None:
        """One item's result: its vector (D,), or None and the reason it was skipped. `text_vector` is its
        caption's vector when the caller embedded captions itself (the Ray actors do)."""
        acc = self.pending[part]
        acc["seen"] += 1
        if vector is None:
            acc["skipped"].append((item.key, reason or "failed"))
        else:
            acc["vecs"].append(vector)
            acc["rows"].append(metadata_row(item, sha))
            if text_vector is not None:
                acc["txt"].append(text_vector)
        if acc["seen"] == len(self.parts[part]):
            self._write(part, self.pending.pop(part))

    def _write(self, part: int, acc: dict) -> None:
        dim = len(acc["vecs"][0]) if acc["vecs"] else 0
        img = np.stack(acc["vecs"]) if acc["vecs"] else np.zeros((0, dim), np.float32)
        text = None
        if self.captions:
            caps = [r["caption"] for r in acc["rows"]]
            if len(acc["txt"]) == len(caps) and caps:
                text = np.stack(acc["txt"])
            else:
                text = self.embed_texts(caps) if caps else np.zeros((0, img.shape[1]), np.float32)
        eo.write_part(self.out, part, len(self.parts), img, text, acc["rows"], acc["skipped"], self.dtype)
        self.skipped += acc["skipped"]
        self.embedded += len(acc["rows"])


def embed_to_folder(
    inputs: str | Path | Sequence[str | Path],
    encoder,
    out: str | Path,
    *,
    part_size: int = DEFAULT_PART_SIZE,
    batch_size: int = 64,
    workers: int | None = None,
    exact_decode: bool = False,
    dtype: str = "float16",
    progress: bool = False,
    cached=None,
    video_interval: float | None = None,
    video_max_frames: int | None = None,
) -> eo.EmbedSummary:
    """Embed a folder, manifest or shards into `out` (see embed_output.py). Resumable: finished parts are kept.

    `encoder` is a clipforge `Encoder` (it needs `.preprocess`, `.embed_pixels`, `.identity`). `cached`: rows
    already known by file sha256 (`.shas`, `.embed(shas)`, e.g. a locked image tower's feature cache): those
    files are read and hashed but not decoded, and their vectors come from it. Videos (files, or in folders)
    are a row per moment sampled as `Collection.add` samples them (`video_interval`, `video_max_frames`)."""
    _check(batch_size, part_size, dtype)
    sampling = Sampling.of(video_interval, video_max_frames)
    out = Path(out)
    items, parts, done = plan(
        inputs, encoder.identity, encoder.dim, out, part_size, dtype, exact_decode, sampling
    )
    todo = [p for p in range(len(parts)) if p not in done]
    side = eo.read_sidecar(out)
    asm = PartAssembler(out, parts, todo, side["captions"], dtype, encoder.embed_texts)
    jobs = [(p, b) for p in todo for b in chunks(parts[p], batch_size)]
    prep = bulk_preprocess(encoder.preprocess, exact_decode)
    workers = default_workers() if workers is None else workers
    bar = _bar(sum(len(parts[p]) for p in todo), progress)
    known = {it.key: cached.shas for p in todo for it in parts[p]} if cached is not None else None
    for (part, batch), dec in zip(jobs, decode_batches([b for _, b in jobs], prep, workers, known)):
        vecs = iter(encoder.embed_pixels(dec.pixels)) if dec.ok else iter(())
        hits = [s for s, st in zip(dec.sha256, dec.status) if st == UNCHANGED]
        from_cache = iter(cached.embed(hits).numpy()) if hits else iter(())
        for item, status, sha in zip(batch, dec.status, dec.sha256):
            if status == UNCHANGED:
                asm.add(part, item, next(from_cache), sha, None)
            else:
                asm.add(part, item, next(vecs) if status is None else None, sha, status)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(skipped=len(asm.skipped) + sum(len(a["skipped"]) for a in asm.pending.values()))
    if bar is not None:
        bar.close()
    return _summary(out, len(items), len(parts), len(done))


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embed", smoothing=0.1)


def _summary(out: Path, n_items: int, n_parts: int, n_done_before: int) -> eo.EmbedSummary:
    skipped = eo.collect_skipped(out)
    return eo.EmbedSummary(
        out=str(out),
        items=n_items,
        embedded=n_items - len(skipped),
        parts=n_parts,
        parts_done_before=n_done_before,
        skipped=skipped,
    )
