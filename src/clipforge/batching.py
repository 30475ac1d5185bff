"""Batching helpers for inference: a micro-batcher for services, length-bucketed text encoding and image decode
overlapped with the model.

- `MicroBatcher(fn, max_batch_size, max_wait_ms)`: concurrent single requests (threads or asyncio) are grouped
  into one call of `fn(list_of_items) -> list_of_results`; each caller gets its own result.
- `encode_texts_bucketed(model, tokens, batch_size)`: sorts texts by length so each batch holds similar lengths,
  which the text tower's trimming then runs without padding work; the original order is restored. Exact.
- `encode_images_overlapped(model, sources, preprocess, batch_size, workers)`: decodes and preprocesses the
  next batch in a thread pool while the model runs the current one (Pillow and torch release the GIL).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class BatchSizes:
    """How many batches of each size a `MicroBatcher` has run: one counter per possible size, so a server that
    runs for months holds the same few integers as one that just started."""

    def __init__(self, max_batch_size: int) -> None:
        self.counts = [0] * (max_batch_size + 1)  # counts[n]: batches of n items

    def record(self, n: int) -> None:
        self.counts[n] += 1

    @property
    def batches(self) -> int:
        return sum(self.counts)

    @property
    def items(self) -> int:
        return sum(n * c for n, c in enumerate(self.counts))

    @property
    def largest(self) -> int:
        """The size of the largest batch run so far (0 before the first)."""
        return max((n for n, c in enumerate(self.counts) if c), default=0)

    def __len__(self) -> int:
        # The number of batches run: what the service's encoder-batch counter reads.
        return self.batches


class MicroBatcher:
    """Groups single requests arriving within `max_wait_ms` of the first (up to `max_batch_size`) into one call.

    `fn` takes a list of items and returns a list of results of the same length, in order. A failure of `fn`
    is raised to every caller of that batch. Use as a context manager, or call `close()`."""

    def __init__(
        self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32, max_wait_ms: float = 5.0
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.batch_sizes = BatchSizes(max_batch_size)  # for monitoring and tests; bounded memory
        self._queue: list[tuple[Any, Future]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="clipforge-microbatcher", daemon=True)
        self._worker.start()

    def submit(self, item: Any) -> Future:
        """Queue one item; the Future resolves to its result."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            self._queue.append((item, fut))
            self._cond.notify()
        return fut

    def __call__(self, item: Any, timeout: float | None = None) -> Any:
        """Blocking single request (from any thread)."""
        return self.submit(item).result(timeout)

    async def acall(self, item: Any) -> Any:
        """Awaitable single request (from an asyncio event loop)."""
        return await asyncio.wrap_future(self.submit(item))

    def _next_batch(self) -> list[tuple[Any, Future]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[: self.max_batch_size], self._queue[self.max_batch_size :]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return  # closed and drained
            # A caller that gave up (timeout, client gone) cancelled its future: drop it. Marking the rest
            # running means they can no longer be cancelled, so setting their results below cannot fail.
            batch = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = list(self.fn(items))
                if len(results) != len(items):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(items)} items"
                    )
            except BaseException as e:
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            self.batch_sizes.record(len(items))
            for (_, fut), r in zip(batch, results):
                fut.set_result(r)

    def close(self) -> None:
        """Stop accepting requests; the ones already queued still run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def text_lengths(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """(N, T) ids -> (N,) number of tokens up to and including the end-of-text token (T if it has none)."""
    is_eot = tokens == eot_token_id
    return torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1) + 1, tokens.shape[1])


@torch.no_grad()
def encode_texts_bucketed(
    model: Any, tokens: torch.Tensor, batch_size: int = 256, normalize: bool = False
) -> torch.Tensor:
    """`model.encode_text` over (N, T) tokens in batches of similar length; rows come back in input order.

    Each batch is trimmed to its own longest text by the tower, so short texts no longer pay for one long one
    in their batch. Results equal one unbatched call up to floating-point summation order."""
    eot = model.config.text.eot_token_id
    order = torch.argsort(text_lengths(tokens, eot), stable=True)
    out: torch.Tensor | None = None
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        f = model.encode_text(tokens[idx], normalize=normalize)
        if out is None:
            out = f.new_empty(len(order), f.shape[1])
        out[idx.to(f.device)] = f
    if out is None:
        raise ValueError("encode_texts_bucketed got no texts")
    return out


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def prefetch_batches(
    sources: Sequence[Any], preprocess: Callable[[Any], torch.Tensor], batch_size: int, workers: int = 2
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) batches of `preprocess(source)`, decoding the next batch while the caller works."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = None
        for chunk in _chunks(sources, batch_size):
            nxt = [pool.submit(preprocess, s) for s in chunk]
            if pending is not None:
                yield torch.stack([f.result() for f in pending])
            pending = nxt
        if pending is not None:
            yield torch.stack([f.result() for f in pending])


@torch.no_grad()
def encode_images_overlapped(
    model: Any,
    sources: Iterable[Any],
    preprocess: Callable[[Any], torch.Tensor],
    batch_size: int = 32,
    workers: int = 2,
    normalize: bool = False,
) -> torch.Tensor:
    """`model.encode_image` over image files/bytes/PIL images with decoding overlapped with inference."""
    feats = [
        model.encode_image(x, normalize=normalize)
        for x in prefetch_batches(list(sources), preprocess, batch_size, workers)
    ]
    if not feats:
        raise ValueError("encode_images_overlapped got no images")
    return torch.cat(feats)
