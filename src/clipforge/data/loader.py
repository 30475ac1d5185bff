"""Training and evaluation batches from any source `clipforge.data.sources` reads, decoded in worker processes.

    loader = build_loader("train.jsonl", preprocess_cfg=cfg.preprocess, tokenizer=tok, batch_size=256)
    for images, tokens in loader:        # (B, 3, S, S) float32, (B, T) long
        ...

How an epoch is split (so that no sample is read twice per epoch and every rank yields the same number of
batches, which distributed training needs):

- Manifests: the epoch's order is a permutation seeded by (seed, epoch). Rank r reads global positions
  r, r + W, r + 2W, ...; its batch b is positions [bB, (b+1)B) of that stream and is decoded by one worker
  (batches go round-robin over workers, which is also the order DataLoader returns them in). A training
  epoch has floor(N / (W B)) batches per rank. A bad sample is replaced by the next unused sample of the
  epoch's tail, dealt out per worker; only when a worker's share of the tail runs out does it draw from the
  next permutation, where a sample may repeat.
- Shards: split rank-strided, then worker-strided (a fixed assignment, so the batch count is the same every
  epoch); each worker reads its shards in an order shuffled per epoch, through a seeded shuffle buffer, and
  yields as many full batches as its shards hold, every rank as many as the smallest can. Only bad samples
  or a `samples_per_epoch` beyond the data make a worker read its shards a second time. Shards of equal
  size, at least ranks x workers of them (ideally a multiple), keep every worker busy and waste least.

Random choices (the caption among several, the crop) are seeded by (seed, epoch, sample), so a run is
reproducible (for manifests, whatever the number of workers). Workers return their bad-sample counts with each
batch; the main process adds them up in `loader.stats` (with the first few reasons) and raises `BadDataError`
naming examples when more than `max_bad_fraction` of the samples read were bad. The loader logs nothing
itself: its caller reports `stats` (training writes them to the run's log.txt).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from clipforge.data import shards as sh
from clipforge.data.batches import (
    MAX_EXAMPLES,
    MIN_SAMPLES_TO_JUDGE,
    ManifestBatches,
    Payload,
    Plan,
    ShardBatches,
    quotas,
)
from clipforge.data.sources import open_source, role_items
from clipforge.model.config import PreprocessConfig
from clipforge.tokenizer import Tokenizer


class BadDataError(ValueError):
    """Too many bad samples (or none readable at all); the message names examples."""


@dataclass
class LoaderStats:
    """What one pass over the loader read. `seen` counts good and bad samples."""

    seen: int = 0
    bad: int = 0
    batches: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0


@dataclass(frozen=True)
class BatchMeta:
    """What a batch holds, row by row (with `return_meta=True`): sample keys and the captions chosen."""

    keys: list[str]
    captions: list[str]


# ------------------------------------------------------------------------------------------ main process


class Loader:
    """Iterable of (images (B, 3, S, S) float32, tokens (B, T) long) for one epoch of one rank; with
    `return_meta`, (images, tokens, BatchMeta). `len(loader)` is the number of batches an iteration yields
    (the epoch's batches from `start_batch` on); `stats` describes the last iteration."""

    def __init__(
        self,
        kind: str,
        items: list,
        counts: list[int] | None,
        plan: Plan,
        tokenizer: Tokenizer,
        workers: int,
        return_meta: bool,
    ) -> None:
        self.kind, self._items, self._counts, self.plan = kind, items, counts, plan
        self.tokenizer, self.workers, self.return_meta = tokenizer, workers, return_meta
        self.stats = LoaderStats()

    @property
    def num_samples(self) -> int | None:
        """Samples in the source (None for remote shards without a count)."""
        return len(self._items) if self.kind == "manifest" else (sum(self._counts) if self._counts else None)

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.steps

    def __len__(self) -> int:
        return max(0, self.plan.steps - self.plan.start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Read another epoch (a new shuffle, new captions and crops) from `start_batch` on."""
        _check_start(start_batch, self.plan.steps)
        self.plan = dataclasses.replace(self.plan, epoch=epoch, start_batch=start_batch)

    def _dataset(self) -> IterableDataset:
        if self.kind == "manifest":
            return ManifestBatches(self._items, self.plan, self.workers)
        return ShardBatches(self._items, self.plan, self.workers)

    def __iter__(self) -> Iterator[tuple]:
        self.stats = LoaderStats()
        if len(self) == 0:
            return
        dl = DataLoader(
            self._dataset(),
            batch_size=None,  # workers make whole batches
            num_workers=self.workers,
            prefetch_factor=2 if self.workers else None,
        )
        for p in dl:
            self._account(p)
            if p.images is None:
                continue
            self.stats.batches += 1
            tokens = self.tokenizer(p.captions)  # (B, T); tokenized here so workers need no tokenizer
            yield (
                (p.images, tokens, BatchMeta(p.keys, p.captions)) if self.return_meta else (p.images, tokens)
            )
        self._check(final=True)

    def _account(self, p: Payload) -> None:
        st = self.stats
        st.seen += p.seen
        st.bad += p.bad
        for msg in p.examples:
            if len(st.examples) < MAX_EXAMPLES:
                st.examples.append(msg)
        if p.failed:
            raise BadDataError(self._message(f"a loader worker gave up ({p.failed})"))
        self._check(final=False)

    def _check(self, final: bool) -> None:
        st, f = self.stats, self.plan.max_bad_fraction
        if st.bad > f * st.seen and (final or st.seen >= MIN_SAMPLES_TO_JUDGE):
            raise BadDataError(self._message(f"more than max_bad_fraction={f} of the samples are bad"))

    def _message(self, why: str) -> str:
        st = self.stats
        examples = "; ".join(st.examples) or "none recorded"
        return f"{why}: {st.bad} bad of {st.seen} read ({st.bad_fraction:.1%}). Examples: {examples}"


def _check_start(start_batch: int, steps: int) -> None:
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch must be in [0, {steps}] (the epoch's batches), got {start_batch}")


def _steps(total: int, batch_size: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """(batches per epoch for this rank, primary positions of its stream) for `total` samples an epoch."""
    if train:
        steps = total // (world_size * batch_size)
        if steps == 0:
            raise ValueError(
                f"an epoch of {total} samples is smaller than one global batch "
                f"({world_size} ranks x {batch_size}); use a smaller batch size or more data"
            )
        return steps, steps * batch_size
    positions = max(0, math.ceil((total - rank) / world_size))
    return math.ceil(positions / batch_size), positions


def build_loader(
    source: str | Path | Sequence[str | Path],
    *,
    preprocess_cfg: PreprocessConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    train: bool = True,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    max_bad_fraction: float = 0.01,
    samples_per_epoch: int | None = None,
    start_batch: int = 0,
    return_meta: bool = False,
) -> Loader:
    """A `Loader` over `source` for rank `rank` of `world_size`.

    train=True: `TrainTransform` (random resized crop) and a random caption, both seeded by (seed, epoch,
    sample); a shuffled order seeded by (seed, epoch); every rank yields floor(samples / (world_size *
    batch_size)) full batches. train=False: `Preprocess` and the first caption, file order, the last batch
    may be short and bad samples shrink their batch. `samples_per_epoch` sets the epoch's length (global,
    all ranks) instead of the source's size (training over remote shards needs it; evaluation over shards
    reads every sample once).
    `start_batch` resumes an epoch after the batches already consumed (manifests skip them without
    decoding; shards read past them without decoding).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or workers < 0 or seed < 0 or epoch < 0:
        raise ValueError(
            f"invalid loader settings: batch_size={batch_size}, rank={rank}, world_size={world_size}, "
            f"workers={workers}, seed={seed}, epoch={epoch} (need batch_size >= 1, 0 <= rank < world_size, "
            "workers >= 0, seed >= 0, epoch >= 0)"
        )
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    kind, items = open_source(source)
    counts = sh.shard_counts(items) if kind == "shards" else None
    if samples_per_epoch is not None:
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        total = samples_per_epoch
    elif kind == "manifest":
        total = len(items)
    elif counts is not None:
        total = sum(counts)
    else:
        raise ValueError(f"cannot count the samples of remote shards {items[:2]}...; pass samples_per_epoch")
    if kind == "shards" and len(items) < world_size:
        raise ValueError(f"{len(items)} shards cannot be split over {world_size} ranks; write more shards")
    steps, positions = _steps(total, batch_size, rank, world_size, train)
    role_quotas: tuple[int, ...] = ()
    if kind == "shards":
        steps, role_quotas = _shard_steps(
            items, counts, rank, world_size, workers, batch_size, train, steps, samples_per_epoch is None
        )
        if steps == 0:
            raise ValueError(
                f"no worker has a full batch of {batch_size} samples in its shards; use smaller batches"
                if train
                else f"no samples in the shards of rank {rank}"
            )
        if not train and start_batch:
            raise ValueError("start_batch is only supported for training over shards")
    _check_start(start_batch, steps)
    plan = Plan(
        preprocess_cfg,
        batch_size,
        train,
        rank,
        world_size,
        seed,
        epoch,
        steps,
        start_batch,
        max_bad_fraction,
        positions,
        role_quotas,
    )
    return Loader(kind, items, counts, plan, tokenizer, workers, return_meta)


def _shard_steps(
    urls: list[str],
    counts: list[int] | None,
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    train: bool,
    steps: int,
    one_pass: bool,
) -> tuple[int, tuple[int, ...]]:
    """(batches per epoch, batches per worker role) for shards. Training: each role yields at most the full
    batches its own shards hold, and every rank the same number (the smallest rank's), unless
    samples_per_epoch asked for more; evaluation: every sample once, each role's last batch may be short."""
    if counts is None:
        if not train:
            raise ValueError("evaluation over shards needs local shards (to count their samples)")
        n = len(role_items(len(urls), rank, world_size, workers))
        return steps, tuple(quotas([1] * n, steps))

    def full_batches(r: int) -> list[int]:
        return [
            sum(counts[i] for i in idx) // batch_size for idx in role_items(len(urls), r, world_size, workers)
        ]

    if not train:
        mine = role_items(len(urls), rank, world_size, workers)
        return sum(math.ceil(sum(counts[i] for i in idx) / batch_size) for idx in mine), ()
    if one_pass:  # no samples_per_epoch: no role reads its shards twice
        steps = min(steps, *(sum(full_batches(r)) for r in range(world_size)))
    return steps, tuple(quotas(full_batches(rank), steps))
