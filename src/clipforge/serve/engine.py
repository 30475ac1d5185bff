"""What the HTTP layer calls: one collection and one encoder per process, used from asyncio handlers.

- Reads use one read-only view of the collection on one dedicated reader thread (its SQLite connection
  belongs to the thread that opened it; FAISS search and a row lookup take well under a millisecond at 100k
  items).
- Writes run on a second, single writer thread, so they are serialised and never hold up a read: each
  write opens the collection for writing, commits its batches and closes it. SQLite runs in WAL mode, so
  the reader keeps answering from the last committed state meanwhile, and catches up (`refresh`) before
  the write's request is answered. Several worker processes share one collection folder the same way.
- Encoder calls from concurrent requests are grouped by `MicroBatcher`s (one for texts, one for images),
  and recent text vectors are cached (repeated queries and classifier prompts cost nothing).
- Work whose request was abandoned (the 504 of the request timeout, which cancels the handler) is dropped
  where it has not started: encoder items still queued in a batcher, reads and writes still queued for
  their thread. Work already running (one encoder batch, one write) finishes: a write is never cut short
  between its batches.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from clipforge.atomic import write_bytes_atomic
from clipforge.batching import MicroBatcher
from clipforge.index import Collection, Hit
from clipforge.index.query import combine
from clipforge.index.rank import Ranking, query_words
from clipforge.index.types import EncoderLike
from clipforge.media.video import parse_frame_key

from .config import ServeConfig, default_thumb_dir

T = TypeVar("T")
MAX_ID = 2**63 - 1  # SQLite integer range: a larger id cannot exist, and would overflow the driver
TEXT_CACHE = 8192


class NotFound(LookupError):
    """An id that names no stored item (or an item with no image file)."""


class Engine:
    def __init__(self, config: ServeConfig, encoder: EncoderLike) -> None:
        self.config = config
        self.encoder = encoder
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="clipforge-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="clipforge-write")
        self._closed = False
        self.collection: Collection = self._reader.submit(
            Collection.open, config.collection, readonly=True
        ).result()
        self._stats = {"items": len(self.collection), "index": self.collection.kind}
        self._stats_refresh: Future | None = None
        self.collection.check_encoder(encoder)  # refuse to serve vectors from another model
        self.identity = dict(self.collection.identity)
        self.thumb_dir = config.thumb_dir or default_thumb_dir(config.collection)
        self.text_batcher = MicroBatcher(self._embed_texts, config.batch_size, config.batch_wait_ms)
        self.image_batcher = MicroBatcher(self._embed_images, config.batch_size, config.batch_wait_ms)
        self._text_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()  # (long, text) ->
        self.policy = None  # an apps.moderation.Moderator: its prompts are embedded once, here
        if config.policy is not None:
            from clipforge.apps.moderation import Moderator

            self.policy = Moderator(encoder, config.policy)

    def _embed_texts(self, keys: list[tuple[str, str]]) -> list[np.ndarray]:
        """(long, text) pairs -> vectors, one encoder call per strategy in the batch."""
        out: dict[int, np.ndarray] = {}
        for long in dict.fromkeys(k[0] for k in keys):
            at = [i for i, k in enumerate(keys) if k[0] == long]
            texts = [keys[i][1] for i in at]
            # Only the library's Encoder reads past the context; other encoders are called as the protocol says.
            vecs = (
                self.encoder.embed_texts(texts, long=long)
                if long != "truncate"
                else self.encoder.embed_texts(texts)
            )
            out.update(zip(at, np.asarray(vecs, np.float32)))
        return [out[i] for i in range(len(keys))]

    def _embed_images(self, images: list[Any]) -> list[np.ndarray]:
        return list(np.asarray(self.encoder.embed_images(images), np.float32))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.text_batcher.close()
        self.image_batcher.close()
        self._writer.shutdown()  # waits for a write in progress
        self._reader.submit(self.collection.close).result()
        self._reader.shutdown()

    # ---- threads ------------------------------------------------------------------------------------
    async def on_reader(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the reader thread; cancelled while queued (request abandoned), it never runs."""
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    async def on_writer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    def _refresh(self) -> None:
        """(reader thread) Catch the view up with what was committed since, and note its size."""
        self.collection.refresh()
        self._stats = {"items": len(self.collection), "index": self.collection.kind}

    async def embed_texts(self, texts: list[str], long: str = "truncate") -> np.ndarray:
        """(N, D) unit vectors; cached texts skip the model, the rest join whatever batch is forming. `long`:
        how a text past the context length is read (clipforge.long_text)."""
        keys = [(long, t) for t in texts]
        # Take the cached vectors before awaiting: other requests may evict entries meanwhile.
        found = {k: self._text_cache[k] for k in keys if k in self._text_cache}
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        found.update(zip(todo, await asyncio.gather(*(self.text_batcher.acall(k) for k in todo))))
        out = np.stack([found[k] for k in keys]) if texts else np.zeros((0, self.dim), np.float32)
        for t in found:
            self._text_cache[t] = found[t]
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > TEXT_CACHE:
            self._text_cache.popitem(last=False)
        return out

    async def embed_images(self, images: list[Any]) -> np.ndarray:
        """Decoded PIL images -> (N, D) unit vectors."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return np.stack(await asyncio.gather(*(self.image_batcher.acall(im) for im in images)))

    @property
    def dim(self) -> int:
        return int(self.collection.dim)

    # ---- reading ------------------------------------------------------------------------------------
    def _row(self, id: int) -> Hit:
        _check_id(id)
        self._refresh()
        hit = self.collection.get(id)
        if hit is None:
            raise NotFound(f"no item with id {id}")
        return hit

    async def get(self, id: int) -> Hit:
        return await self.on_reader(self._row, id)

    def _vector(self, id: int) -> np.ndarray:
        self._row(id)
        return self.collection.vectors([id])[0]

    async def vector_of(self, id: int) -> np.ndarray:
        return await self.on_reader(self._vector, id)

    async def search(
        self,
        *,
        texts: list[str] | None,
        images: list[Any],
        vectors: list[np.ndarray],
        weights: tuple[float, float],
        negatives: list[str] | None,
        negative_weight: float,
        k: int,
        long: str = "truncate",
        ranking: Ranking = Ranking(),
        **filters: Any,
    ) -> list[Hit]:
        """Top-k hits for any mix of texts, decoded images and raw vectors: the vectors come from the
        batchers, `index.query.combine` sums them as `Collection.search` would, and `Collection.rank` ranks
        (filters: see `Collection.search`). `long`: how a text past the context length is read."""
        words = query_words(texts, ranking, plain=not (images or vectors or negatives))
        q = None
        if ranking.mode != "keyword":
            all_texts = (texts or []) + (negatives or [])
            tv = await self.embed_texts(all_texts, long) if all_texts else np.zeros((0, self.dim), np.float32)
            n = len(texts or [])
            q = combine(
                self.dim,
                texts=tv[:n] if n else None,
                images=await self.embed_images(images) if images else None,
                vectors=np.stack(vectors) if vectors else None,
                weights=weights,
                negatives=tv[n:] if negatives else None,
                negative_weight=negative_weight,
            )
            if not np.isfinite(q).all() or np.linalg.norm(q) < 1e-6:
                raise ValueError(
                    "the query cancels out to a zero vector; change the weights or the negatives"
                )

        def run() -> list[Hit]:
            self._refresh()  # pick up rows another process (or our own writer) committed
            return self.collection.rank(q, words, k=k, ranking=ranking, **filters)

        return await self.on_reader(run)

    def info(self) -> dict:
        """Size and index kind as of the reader's last look, answered at once (health checks must not queue
        behind reads, let alone writes); a look is scheduled on the reader thread for the next caller."""
        if not self._closed and (self._stats_refresh is None or self._stats_refresh.done()):
            self._stats_refresh = self._reader.submit(self._refresh)
        return dict(self._stats)

    # ---- zero-shot ----------------------------------------------------------------------------------
    async def classifier(self, labels: list[str], templates: list[str]) -> Any:
        """A `zeroshot.ZeroShotClassifier` whose prompt vectors came through the batcher and text cache."""
        from clipforge.zeroshot import ZeroShotClassifier, label_prompts, load_templates

        templates = load_templates(templates)  # validates: each holds "{}" once
        vectors = await self.embed_texts(label_prompts(labels, templates, clean=False))
        return ZeroShotClassifier.from_text_vectors(
            labels, vectors, templates, logit_scale=float(self.encoder.logit_scale), clean=False
        )

    async def classify(self, image_vec: np.ndarray, labels: list[str], templates: list[str]) -> np.ndarray:
        """Probabilities (L,) of each label for one image vector (D,)."""
        clf = await self.classifier(labels, templates)
        return clf.predict_proba_vectors(image_vec[None])[0]

    async def moderate(self, image_vec: np.ndarray) -> dict:
        """The policy's decision for one image vector (D,): allow / review / block, and each category's."""
        if self.policy is None:
            raise NotFound("no moderation policy is configured (start the server with --policy FILE)")
        result = (await asyncio.to_thread(self.policy.moderate_vectors, image_vec[None]))[0]
        cats = [
            {"name": name, "score": c["score"], "decision": c["decision"], "fired": c["fired"]}
            for name, c in result["categories"].items()
        ]
        return {"decision": result["decision"], "categories": cats}

    # ---- files --------------------------------------------------------------------------------------
    # Paths come only from stored rows, never from a request: a route names an item by its id.
    async def image_file(self, id: int) -> Path:
        hit = await self.get(id)
        if not hit.path:
            raise NotFound(f"item {id} is a text item and has no image")
        if frame_of(hit):
            raise NotFound(f"item {id} is a moment of a video: /api/videos/{id} serves the video")
        return _on_server(Path(hit.path), f"the image file of item {id}")

    async def video_file(self, id: int) -> Path:
        """The video file of an item that is one of its sampled frames."""
        frame = frame_of(await self.get(id))
        if frame is None:
            raise NotFound(f"item {id} is not a moment of a video")
        return _on_server(Path(frame[0]), f"the video file of item {id}")

    async def thumbnail(self, id: int) -> Path:
        """A JPEG of at most thumb_size per side (a video frame's: the frame at its moment), made once and
        cached under the item's content hash."""
        hit = await self.get(id)
        size = self.config.thumb_size
        target = self.thumb_dir / f"{id}-{(hit.sha256 or 'nohash')[:16]}-{size}.jpg"
        if target.is_file():
            return target
        frame = frame_of(hit)
        src = await (self.video_file(id) if frame else self.image_file(id))
        await asyncio.to_thread(self._make_thumb, src, target, size, frame[1] if frame else None)
        return target

    def _make_thumb(self, src: Path, target: Path, size: int, t: float | None) -> None:
        from clipforge.transforms import load_image

        if t is None:
            img = load_image(src, max_pixels=self.config.max_pixels, draft_size=size)
        else:
            from clipforge.media.video import frame_at

            img = frame_at(src, t, max_pixels=self.config.max_pixels)
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        target.parent.mkdir(parents=True, exist_ok=True)
        # atomic: concurrent requests for one thumbnail never see half a file; a lost one is made again
        write_bytes_atomic(target, buf.getvalue(), durable=False)

    # ---- writing ------------------------------------------------------------------------------------
    def _save_upload(self, data: bytes, fmt: str) -> str:
        ext = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}.get(fmt, ".png")
        folder = self.config.collection / "uploads"
        folder.mkdir(exist_ok=True)
        p = folder / (hashlib.sha256(data).hexdigest()[:32] + ext)
        if not p.exists():
            p.write_bytes(data)
        return str(p.absolute())

    async def add(
        self,
        paths: list[str],
        texts: list[str],
        uploads: list[tuple[bytes, str]],
        video_interval: float | None = None,
        video_max_frames: int | None = None,
    ) -> dict:
        """Store files, captions and uploads on the writer thread; answered once the reader sees them. Videos
        are sampled as `Collection.add` samples them."""
        sampling = {"video_interval": video_interval, "video_max_frames": video_max_frames}

        def run() -> dict:
            saved = [self._save_upload(data, fmt) for data, fmt in uploads]
            out = {"ids": [], "added": 0, "updated": 0, "unchanged": 0, "failed": []}
            with Collection.open(self.config.collection) as writer:
                if paths or saved:
                    rep = writer.add([*paths, *saved], self.encoder, **sampling)
                    out["ids"] += rep.ids
                    out["added"] += len(rep.added)
                    out["updated"] += len(rep.updated)
                    out["unchanged"] += len(rep.unchanged)
                    out["failed"] += [[p, why] for p, why in rep.failed]
                if texts:
                    ids = writer.add_texts(texts, self.encoder)
                    out["ids"] += ids
                    out["added"] += len(ids)
            return out

        out = await self.on_writer(run)
        await self.on_reader(self._refresh)  # "searchable at once" for the client that wrote it
        return out

    async def remove(self, id: int) -> int:
        def run() -> int:
            _check_id(id)
            with Collection.open(self.config.collection) as writer:
                n = writer.remove(id)
            if not n:
                raise NotFound(f"no item with id {id}")
            return n

        n = await self.on_writer(run)
        await self.on_reader(self._refresh)
        return n


def frame_of(hit: Hit) -> tuple[str, float] | None:
    """(video path, seconds) of a hit that is a sampled frame of a video (index/videos.py stores them with
    `video` and `t` in their metadata), else None."""
    if not hit.path or "video" not in hit.metadata:
        return None
    return parse_frame_key(hit.path)


def _on_server(p: Path, what: str) -> Path:
    if not p.is_file():
        raise NotFound(f"{what} is no longer on the server")
    return p


def _check_id(id: int) -> None:
    if not 0 <= id <= MAX_ID:
        raise NotFound(f"no item with id {id}")
