"""Worker side of the loader: what each DataLoader worker process reads, decodes and sends back.

A worker yields whole batches (`Payload`: images, captions, keys and the bad samples it met); the main
process (`clipforge.data.loader`) tokenizes, adds up the bad-sample counts and decides when to fail.
See `loader.py` for how an epoch is split over ranks and workers.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.sample import Sample
from clipforge.data.sources import role_items
from clipforge.data.tars import shard_samples
from clipforge.model.config import PreprocessConfig
from clipforge.transforms import Preprocess, TrainTransform

MIN_SAMPLES_TO_JUDGE = 500  # judge the bad fraction mid-epoch only after this many samples
MAX_CONSECUTIVE_BAD = 1000  # a worker that reads this many bad samples in a row gives up
MAX_EXAMPLES = 5  # bad samples named in the log and in LoaderStats
SHUFFLE_BUFFER = 1000  # shard records held by each worker's shuffle buffer


@dataclass(frozen=True)
class Plan:
    """What one rank reads in one epoch; sent (pickled or forked) to every worker."""

    preprocess: PreprocessConfig
    batch_size: int
    train: bool
    rank: int
    world_size: int
    seed: int
    epoch: int
    steps: int  # batches this rank yields in the whole epoch
    start_batch: int
    max_bad_fraction: float
    positions: int  # manifests: length of this rank's stream of primary positions
    quotas: tuple[int, ...] = ()  # shards: batches each worker role yields in the epoch (training)


@dataclass
class Payload:
    """One batch from a worker, with the bad samples it met while making it."""

    images: torch.Tensor | None  # (B, 3, S, S) or None when every sample was bad
    captions: list[str]
    keys: list[str]
    seen: int
    bad: int
    examples: list[str]
    failed: str | None = None


class GiveUp(Exception):
    """A worker stops: too many bad samples, or none readable. The main process turns it into BadDataError."""


def _seeds(*parts: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (caption choice, crop) from integer parts."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2)
    return int(a), int(b)


def _key_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _role(start_batch: int, n: int) -> int:
    """This DataLoader worker's role among `n`: worker w plays role (w + start_batch) % n and decodes the
    batches b = role (mod n), b >= start_batch, so that batch `start_batch` is worker 0's first (DataLoader
    asks worker 0 first and then goes round-robin). Workers beyond `n` get -1 (nothing to read)."""
    info = get_worker_info()
    wid = info.id if info is not None else 0
    return (wid + start_batch) % n if wid < n else -1


def _first_batch(start_batch: int, role: int, n: int) -> int:
    """The smallest b >= start_batch with b = role (mod n)."""
    return start_batch + (role - start_batch) % n


class Decoder:
    """Worker-side: decode, transform and pick a caption for one sample; count what fails. Counts since the
    last payload go out with the next one; totals decide when this worker gives up."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.transform = TrainTransform(plan.preprocess) if plan.train else Preprocess(plan.preprocess)
        self.seen = self.bad = 0  # since the last payload
        self.total_seen = self.total_bad = self.run_of_bad = self.named = 0
        self.examples: list[str] = []

    def __call__(self, sample: Sample, ident: int) -> tuple | None:
        """(tensor (3, S, S), caption, key), or None for a bad sample."""
        self._read()
        key, captions = sample.key, sample.captions
        try:
            if not captions:
                raise ValueError(f"{key}: no caption")
            cap_seed, crop_seed = _seeds(self.plan.seed, self.plan.epoch, ident)
            image: Any = sample.image
            if not isinstance(image, str):  # a shard member: decoded here, so that errors name the record
                cfg = self.plan.preprocess
                image = sample.load(draft_size=cfg.image_size if cfg.fast_jpeg else None)
            if self.plan.train:
                x = self.transform(image, generator=crop_seed)
                caption = captions[cap_seed % len(captions)]
            else:
                x, caption = self.transform(image), captions[0]
        except (ValueError, OSError) as e:  # ImageError is a ValueError; a vanished file an OSError
            self._bad(str(e) if key in str(e) else f"{key}: {e}")
            return None
        self.run_of_bad = 0
        return x, caption, key

    def failure(self, msg: str) -> None:
        """A sample that failed before decoding (a corrupt tar member, a record without image)."""
        self._read()
        self._bad(msg)

    def _read(self) -> None:
        self.seen += 1
        self.total_seen += 1

    def _bad(self, msg: str) -> None:
        self.bad += 1
        self.total_bad += 1
        self.run_of_bad += 1
        if self.named < MAX_EXAMPLES:
            self.examples.append(msg)
            self.named += 1
        if self.run_of_bad >= MAX_CONSECUTIVE_BAD:
            raise GiveUp(f"{MAX_CONSECUTIVE_BAD} bad samples in a row")
        if (
            self.total_seen >= MIN_SAMPLES_TO_JUDGE
            and self.total_bad > self.plan.max_bad_fraction * self.total_seen
        ):
            raise GiveUp(f"{self.total_bad} of {self.total_seen} samples read by one worker were bad")

    def payload(self, items: list[tuple], failed: str | None = None) -> Payload:
        images = torch.stack([x for x, _, _ in items]) if items else None  # (B, 3, S, S)
        out = Payload(
            images,
            [c for _, c, _ in items],
            [k for _, _, k in items],
            self.seen,
            self.bad,
            self.examples,
            failed,
        )
        self.seen = self.bad = 0
        self.examples = []
        return out


# -------------------------------------------------------------------------------------------- manifests


class Order:
    """Global position -> sample index: pass k of the epoch is a permutation seeded by (seed, epoch, k)
    (training) or the file order (evaluation)."""

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool) -> None:
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def __getitem__(self, g: int) -> int:
        k, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if k not in self._perms:
            self._perms[k] = np.random.default_rng([self.seed, self.epoch, k]).permutation(self.n)
        return int(self._perms[k][i])


class ManifestBatches(IterableDataset):
    """Batches of one rank's share of a manifest: batch b is positions [bB, (b+1)B) of the rank's stream
    (global positions r, r + W, ...), decoded by worker role b mod workers; bad samples in a training
    batch are replaced from this role's share of the epoch's unused tail."""

    def __init__(self, samples: list[Sample], plan: Plan, workers: int) -> None:
        self.samples, self.plan, self.workers = samples, plan, max(1, workers)

    def __iter__(self) -> Iterator[Payload]:
        p = self.plan
        n = self.workers
        role = _role(p.start_batch, n)
        dec = Decoder(p)
        order = Order(len(self.samples), p.seed, p.epoch, p.train)
        at = lambda j: order[p.rank + p.world_size * j]  # position j of this rank's stream -> sample index
        spares = itertools.count(p.positions + role, n)  # this role's share of the epoch's unused tail
        try:
            for b in range(_first_batch(p.start_batch, role, n), p.steps, n):
                items = [
                    self._load(dec, at(j))
                    for j in range(b * p.batch_size, min((b + 1) * p.batch_size, p.positions))
                ]
                items = [it for it in items if it is not None]
                while p.train and len(items) < p.batch_size:
                    it = self._load(dec, at(next(spares)))
                    if it is not None:
                        items.append(it)
                yield dec.payload(items)
        except GiveUp as e:
            yield dec.payload([], failed=str(e))

    def _load(self, dec: Decoder, i: int) -> tuple | None:
        return dec(self.samples[i], i)


# ----------------------------------------------------------------------------------------------- shards


def quotas(weights: list[int], steps: int) -> list[int]:
    """Split `steps` batches over roles in proportion to `weights` (largest remainder), so a role with w
    full batches of data gets at most w when steps <= sum(weights)."""
    if sum(weights) == 0:
        weights = [1] * len(weights)
    exact = [steps * w / sum(weights) for w in weights]
    q = [math.floor(e) for e in exact]
    for v in sorted(range(len(q)), key=lambda v: (q[v] - exact[v], v))[: steps - sum(q)]:
        q[v] += 1
    return q


def schedule(per_role: Sequence[int], start_batch: int) -> tuple[list[int], list[int], list[int]]:
    """DataLoader returns batches round-robin over workers, skipping exhausted ones. Replay the first
    `start_batch` of them over roles with `per_role` batches each; -> (roles in the order fresh workers 0, 1, ...
    must play them, batches left per role, batches consumed per role)."""
    n = len(per_role)
    left, used, pos = list(per_role), [0] * n, 0
    for _ in range(start_batch):
        while left[pos] == 0:
            pos = (pos + 1) % n
        left[pos] -= 1
        used[pos] += 1
        pos = (pos + 1) % n
    order = [(pos + i) % n for i in range(n) if left[(pos + i) % n] > 0]
    return order, left, used


class ShardBatches(IterableDataset):
    """Batches of one rank's shards: each worker plays one role, reads that role's shards and yields its
    quota of full batches (training) or all its samples (evaluation)."""

    def __init__(self, urls: list[str], plan: Plan, workers: int) -> None:
        self.urls, self.plan, self.workers = urls, plan, workers

    def __iter__(self) -> Iterator[Payload]:
        p = self.plan
        # The assignment is fixed across epochs, so batch counts are.
        roles = role_items(len(self.urls), p.rank, p.world_size, self.workers)
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if p.train:
            order, left, used = schedule(p.quotas, p.start_batch)
        else:
            order, left, used = list(range(len(roles))), [], []
        if wid >= len(order):
            return
        role = order[wid]
        dec = Decoder(p)
        stream = self._records(dec, [self.urls[i] for i in roles[role]], role)
        try:
            if p.train:
                yield from self._train_batches(dec, stream, used[role], left[role])
            else:
                yield from self._eval_batches(dec, stream)
        except GiveUp as e:
            yield dec.payload([], failed=str(e))

    def _records(self, dec: Decoder, urls: list[str], role: int) -> Iterator[Sample]:
        """This role's samples: one pass (evaluation) or, for training, pass after pass, each pass in a new
        order (shards shuffled, then samples through a buffer) seeded by (seed, epoch, rank, role, pass)."""

        def on_error(e: Exception) -> None:
            dec.failure(f"corrupt shard data: {e}")

        p = self.plan
        for k in itertools.count() if p.train else [0]:
            rng = random.Random(_seeds(p.seed, p.epoch, p.rank, role, k)[0])
            todo = rng.sample(urls, len(urls)) if p.train else urls
            records = itertools.chain.from_iterable(shard_samples(u, on_error) for u in todo)
            if p.train:
                records = buffer_shuffle(records, SHUFFLE_BUFFER, rng)
            got = 0
            for s in records:
                got += 1
                yield s
            if got == 0:
                raise GiveUp(f"no readable samples in shards {urls[:3]}")

    def _train_batches(
        self, dec: Decoder, stream: Iterator[Sample], used: int, left: int
    ) -> Iterator[Payload]:
        bs = self.plan.batch_size
        for _ in range(used * bs):  # resume: skip, without decoding, what earlier batches consumed
            next(stream)
        for _ in range(left):
            items: list[tuple] = []
            while len(items) < bs:
                it = self._decode(dec, next(stream))
                if it is not None:
                    items.append(it)
            yield dec.payload(items)

    def _eval_batches(self, dec: Decoder, stream: Iterator[Sample]) -> Iterator[Payload]:
        items: list[tuple] = []
        for s in stream:
            it = self._decode(dec, s)
            if it is not None:
                items.append(it)
            if dec.seen >= self.plan.batch_size:  # samples read, good or bad
                yield dec.payload(items)
                items = []
        if dec.seen:
            yield dec.payload(items)

    @staticmethod
    def _decode(dec: Decoder, s: Sample) -> tuple | None:
        return dec(s, _key_id(s.key))  # seeded by the key: a shard's order is the shuffle buffer's


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Yield `items` in a random order using a buffer of `size` (a window shuffle, as streams allow)."""
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        buf[i], x = x, buf[i]
        yield x
    rng.shuffle(buf)
    yield from buf
