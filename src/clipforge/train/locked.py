"""Locked-tower training (LiT, Zhai et al. 2022), done fast: a locked tower's trunk runs once per input.

`lock_image` / `lock_text` freeze a tower's trunk (see clipforge.model.tower): everything below its top
`unlock_*_blocks` blocks, final norm, pooling and projection, which train. The trunk's outputs are computed once
into the feature cache (clipforge.train.features) and training reads them: a step runs only the heads.

The loop stays one loop; only the batch source and the module it calls differ:
- an image tower locked: batches of cached rows over a manifest's readable samples, in the loader's order and
  with the loader's caption choice (one per image per epoch); the images are not augmented (the cache holds
  the evaluation preprocessing of each image);
- only the text tower locked: the loader's batches, with each caption replaced by its cached row.
`LockedCLIP` takes those inputs and gives the same `CLIPOutput` as CLIP. With `feature_cache="off"` the same
batches carry decoded images and token ids instead, and the trunks run every step without gradient: slow, for
checking the cache against.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from logging import Logger
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.clip import CLIP, CLIPOutput
from clipforge.train import features as ft
from clipforge.train import optim
from clipforge.train.config import TrainConfig
from clipforge.transforms import Preprocess

BatchMaker = Callable[..., Any]  # (epoch, start_batch) -> an iterable of batches with a len()


@dataclass(frozen=True)
class Side:
    """How one tower trains: `locked` (its trunk frozen and run once), `unlocked` top blocks trained with the
    head, trunk outputs `cached` on disk or computed every step."""

    name: str
    locked: bool
    unlocked: int
    cached: bool


def sides(cfg: TrainConfig) -> tuple[Side, Side]:
    """(image, text). A tower with trainable norm layers changes below its head: it is not locked here."""
    cached = cfg.feature_cache != "off"
    image = Side(
        "image", cfg.lock_image and not cfg.lock_image_norm_trainable, cfg.unlock_image_blocks, cached
    )
    return image, Side("text", cfg.lock_text, cfg.unlock_text_blocks, cached)


def head_parameters(tower: nn.Module, example: torch.Tensor, unlocked: int) -> list[nn.Parameter]:
    """The weights `tower.head(., unlocked)` uses, read from autograd on one example rather than from a list
    in each tower that could drift from its code."""
    params = list(tower.parameters())
    before = [p.requires_grad for p in params]
    with ft.eval_mode(tower):
        with torch.no_grad():
            feats = tower.trunk(example, unlocked)
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                out = tower.head(feats, unlocked)
                grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        finally:
            for p, rg in zip(params, before):
                p.requires_grad_(rg)
    return [p for p, g in zip(params, grads) if g is not None]


class CachedImageRows:
    """Image embeddings of a model whose image tower is locked, read from the feature cache: the cached trunk
    output of a file (keyed by its sha256) through the model's own head. A model trained with the image tower
    locked has the trunk the cache was built with, so this equals running the whole tower (checked by the
    namespace: another trunk, preprocessing or dtype makes another folder, which then holds nothing)."""

    def __init__(self, root: str | Path, model: nn.Module) -> None:
        self.model = model
        tower = model.visual
        size = model.config.vision.image_size
        example = torch.zeros(1, 3, size, size, dtype=next(tower.parameters()).dtype)
        head = {id(p) for p in head_parameters(tower, example, 0)}
        before = {p: p.requires_grad for p in tower.parameters()}
        try:  # the namespace of a run that locked this tower: its head's weights are left out
            for p in tower.parameters():
                p.requires_grad_(id(p) in head)
            store = ft.image_store(root, tower, model.config, 0)
        finally:
            for p, rg in before.items():
                p.requires_grad_(rg)
        self.rows: dict[str, tuple[Path, int]] = store.index()
        self.shas = set(self.rows)
        self._parts: dict[Path, torch.Tensor] = {}

    def _row(self, sha: str) -> torch.Tensor:
        part, row = self.rows[sha]
        if part not in self._parts:
            from safetensors.torch import load_file

            self._parts[part] = load_file(str(part))["out.0"]
        return self._parts[part][row]

    @torch.no_grad()
    def embed(self, shas: Sequence[str]) -> torch.Tensor:
        """(n, D) normalised embeddings of files with these sha256s (all must be in `shas`)."""
        feats = torch.stack([self._row(s) for s in shas])
        dtype = next(self.model.visual.parameters()).dtype
        return torch.nn.functional.normalize(self.model.visual.head(feats.to(dtype), 0).float(), dim=-1)


def lock_towers(model: CLIP, cfg: TrainConfig, tokenizer: Callable[[Sequence[str]], torch.Tensor]) -> None:
    """Freeze the locked towers' weights except their heads (and norm layers with lock_image_norm_trainable)."""
    size = model.config.preprocess.image_size
    towers = (
        (cfg.lock_image, model.visual, torch.zeros(1, 3, size, size), cfg.unlock_image_blocks),
        (cfg.lock_text, model.text, tokenizer([""]), cfg.unlock_text_blocks),
    )
    for lock, tower, example, unlocked in towers:
        if lock:
            head = head_parameters(tower, example.to(next(tower.parameters()).device), unlocked)
            if tower is model.text and cfg.lock_text_head:
                head = []  # the whole tower frozen: image embeddings learn to land in the text tower's space
            norms = cfg.lock_image_norm_trainable and tower is model.visual
            optim.lock_tower(tower, norm_trainable=norms, keep=head)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype) for t in x)
    return x.to(dtype) if x.is_floating_point() else x


class LockedCLIP(nn.Module):
    """CLIP whose locked towers take trunk outputs (cached) or run their trunk without gradient (not cached)
    and then their head; an unlocked tower runs whole. Returns what CLIP.forward returns."""

    def __init__(self, clip: CLIP, image: Side, text: Side) -> None:
        super().__init__()
        self.clip, self.image, self.text = clip, image, text

    def _encode(self, tower: nn.Module, x: Any, side: Side) -> torch.Tensor:
        x = _cast(x, self.clip.dtype)
        if not side.locked:
            return tower(x)
        if not side.cached:
            # As the cache computes it: eval mode (no dropout, BatchNorm statistics as they are).
            with ft.eval_mode(tower), torch.no_grad():
                x = tower.trunk(x, side.unlocked)
        return tower.head(x, side.unlocked)

    def forward(self, images: Any, texts: Any) -> CLIPOutput:
        img = self._encode(self.clip.visual, images, self.image)
        txt = self._encode(self.clip.text, texts, self.text)
        return CLIPOutput(
            F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.clip.scale(), self.clip.logit_bias
        )


# --------------------------------------------------------------------------------------------- batches


class FeatureBatches:
    """Epochs of one rank over a manifest's readable samples, as the loader orders them: the epoch's rank stream
    is positions r, r + W, ... of a permutation seeded by (seed, epoch), batch b its positions [bB, (b+1)B),
    and each sample's caption is chosen by (seed, epoch, sample). `images` maps sample indices and `texts`
    caption indices (into `captions`, all samples' captions end to end) to the towers' inputs."""

    def __init__(
        self,
        counts: Sequence[int],
        images: Callable[[torch.Tensor], Any],
        texts: Callable[[torch.Tensor], Any],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        samples_per_epoch: int | None,
    ) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.images, self.texts = images, texts
        self.B, self.rank, self.world, self.seed = batch_size, rank, world_size, seed
        total = samples_per_epoch or len(counts)
        self.steps = total // (world_size * batch_size)
        if self.steps == 0:
            raise ValueError(
                f"an epoch of {total} samples is smaller than one global batch "
                f"({world_size} ranks x {batch_size}); use a smaller batch size or more data"
            )

    def __call__(self, epoch: int, start_batch: int = 0) -> _Epoch:
        if not 0 <= start_batch <= self.steps:
            raise ValueError(
                f"start_batch must be in [0, {self.steps}] (the epoch's batches), got {start_batch}"
            )
        return _Epoch(self, epoch, start_batch)

    def stream(self, epoch: int) -> np.ndarray:
        """(steps * B,) sample indices of this rank's epoch, in batch order."""
        from clipforge.data.batches import Order

        order = Order(len(self.counts), self.seed, epoch, True)
        return np.array(
            [order[self.rank + self.world * j] for j in range(self.steps * self.B)], dtype=np.int64
        )

    def choices(self, epoch: int) -> torch.Tensor:
        """(N,) each sample's caption this epoch, as an index into all captions."""
        from clipforge.data.batches import _seeds  # the loader's seeding, so both choose the same caption

        pick = [_seeds(self.seed, epoch, i)[0] % int(c) for i, c in enumerate(self.counts)]
        return torch.from_numpy(self.offsets + np.asarray(pick, dtype=np.int64))


class _Epoch:
    def __init__(self, batches: FeatureBatches, epoch: int, start: int) -> None:
        self.batches, self.epoch, self.start = batches, epoch, start

    def __len__(self) -> int:
        return self.batches.steps - self.start

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        fb, B = self.batches, self.batches.B
        stream, chosen = torch.from_numpy(fb.stream(self.epoch)), fb.choices(self.epoch)
        for b in range(self.start, fb.steps):
            idx = stream[b * B : (b + 1) * B]
            yield fb.images(idx), fb.texts(chosen[idx])


class _CachedTexts:
    """The loader's batches with each caption replaced by its cached text trunk row."""

    def __init__(self, loader: Any, texts: Callable[[Sequence[str]], Any]) -> None:
        self.loader, self.texts = loader, texts

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for images, _, meta in self.loader:
            yield images, self.texts(meta.captions)


def _rows(table: tuple[torch.Tensor, ...]) -> Callable[[torch.Tensor], Any]:
    return lambda idx: ft.from_tuple([t[idx] for t in table])


# ------------------------------------------------------------------------------------------------ setup


def cache_root(cfg: TrainConfig) -> Path:
    if cfg.feature_cache == "auto":
        from clipforge.paths import features_dir

        return features_dir()
    return Path(cfg.feature_cache).expanduser()


@dataclass
class Context:
    """What setting up the batch source needs from the loop."""

    cfg: TrainConfig
    model: CLIP
    tokenizer: Any
    is_main: bool
    barrier: Callable[[], None]
    log: Logger
    rank: int = 0
    world_size: int = 1


def setup(ctx: Context, make_loader: BatchMaker) -> tuple[nn.Module, BatchMaker]:
    """(the module a step calls, the batch source) for `ctx.cfg`: the model and the loader when no tower is
    locked; else LockedCLIP and batches carrying the locked towers' trunk outputs."""
    image, text = sides(ctx.cfg)
    if not (image.locked or text.locked):
        return ctx.model, make_loader
    module = LockedCLIP(ctx.model, image, text)
    if image.locked:
        return module, _manifest_batches(ctx, image, text)
    if not text.cached:
        return module, make_loader
    from clipforge.train.vocab import read_captions

    captions = read_captions(ctx.cfg.data, limit=sys.maxsize)
    table = _text_table(ctx, text, captions)
    row = {c: i for i, c in enumerate(captions)}
    texts = _rows(table)

    def lookup(caps: Sequence[str]) -> Any:
        try:
            return texts(torch.tensor([row[c] for c in caps]))
        except KeyError as e:
            raise ft.FeatureCacheError(f"caption {e.args[0]!r:.80} has no cached text features") from None

    return module, lambda epoch, start: _CachedTexts(make_loader(epoch, start, return_meta=True), lookup)


def _built(ctx: Context, build: Callable[[], tuple[list, ft.BuildStats]], what: str) -> list:
    """Rank 0 builds while the others wait; then the others run the same build, which finds every row stored
    and only reads (and hashes), to learn each input's key."""
    if ctx.is_main:
        keys, stats = build()
        rate = stats.computed / stats.seconds if stats.seconds else 0.0
        ctx.log.info(
            "%s features: %d cached, %d computed (%.1f/s), %d unreadable in %.1fs",
            what,
            stats.cached,
            stats.computed,
            rate,
            stats.bad,
            stats.seconds,
        )
        if stats.examples:
            ctx.log.warning("unreadable %s inputs, e.g.: %s", what, "; ".join(stats.examples))
        ctx.barrier()
        return keys
    ctx.barrier()
    return build()[0]


def _text_table(ctx: Context, text: Side, captions: Sequence[str]) -> tuple[torch.Tensor, ...]:
    m = ctx.model
    store = ft.text_store(cache_root(ctx.cfg), m.text, m.config, ctx.tokenizer, text.unlocked)
    build = lambda: ft.build_text_features(  # noqa: E731
        store, m.text, text.unlocked, captions, ctx.tokenizer, progress=ctx.cfg.progress and ctx.is_main
    )
    return store.read(_built(ctx, build, "text"))


def _image_keys(
    ctx: Context, image: Side, samples: Sequence[Any]
) -> tuple[ft.FeatureStore, list[str | None]]:
    cfg, m = ctx.cfg, ctx.model
    store = ft.image_store(cache_root(cfg), m.visual, m.config, image.unlocked)
    build = lambda: ft.build_image_features(  # noqa: E731
        store,
        m.visual,
        image.unlocked,
        samples,
        m.config.preprocess,
        workers=cfg.workers,
        progress=cfg.progress and ctx.is_main,
    )
    return store, _built(ctx, build, "image")


def _readable(ctx: Context, samples: list, keys: list[str | None]) -> list:
    from clipforge.data.loader import BadDataError

    bad = [s.key for s, k in zip(samples, keys) if k is None]
    if len(bad) > ctx.cfg.max_bad_fraction * len(samples) or len(bad) == len(samples):
        raise BadDataError(
            f"{len(bad)} of {len(samples)} samples are unreadable, more than max_bad_fraction="
            f"{ctx.cfg.max_bad_fraction} (examples: {', '.join(bad[:5])}; the log names why)"
        )
    if bad:
        ctx.log.warning("left out %d unreadable samples, e.g. %s", len(bad), ", ".join(bad[:5]))
    return [s for s, k in zip(samples, keys) if k is not None]


def _manifest_samples(cfg: TrainConfig) -> list:
    from clipforge.data.loader import open_source

    kind, items = open_source(list(cfg.data))
    if kind != "manifest":
        raise ft.FeatureCacheError(
            f"{list(cfg.data)}: a locked image tower reads its cached features by image file; give a manifest "
            "or a folder of images (shards are not supported)"
        )
    return items


def _manifest_batches(ctx: Context, image: Side, text: Side) -> FeatureBatches:
    cfg, mcfg = ctx.cfg, ctx.model.config
    samples = _manifest_samples(cfg)
    if image.cached:
        store, keys = _image_keys(ctx, image, samples)
        samples = _readable(ctx, samples, keys)
        images = _rows(store.read([k for k in keys if k is not None]))
    else:  # a checking mode: a sample without captions is left out, an unreadable image stops the run
        samples = [s for s in samples if s.captions]
        preprocess = Preprocess(mcfg.preprocess)

        def images(idx: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S), decoded every step
            return ft.decode([samples[i] for i in idx.tolist()], preprocess)

    captions = [c for s in samples for c in s.captions]
    if text.locked and text.cached:
        texts = _rows(_text_table(ctx, text, captions))
    else:
        texts = lambda j: ctx.tokenizer([captions[i] for i in j.tolist()])  # noqa: E731
    return FeatureBatches(
        [len(s.captions) for s in samples],
        images,
        texts,
        batch_size=cfg.batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=cfg.seed,
        samples_per_epoch=cfg.samples_per_epoch,
    )
