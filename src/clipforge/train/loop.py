"""The training loop: one function, the same code for one process and for many (world size 1 is no special case).

run/config.json        the resolved TrainConfig
run/log.txt            what happened, in words (warnings, such as skipped bad samples, also on the console)
run/metrics.jsonl      one JSON line per logged step ({"step", "loss", "lr", ...}) and per evaluation; a run
                       first drops the lines past the step it starts from, as it redoes those steps
run/tokenizer/         the run's vocabulary
run/checkpoints/step-N resumable state (model, optimiser, scaler, RNG, data position), the last K kept
run/final/             the final model: clipforge.load(run / "final") and Hugging Face both read it
run/plots/curves.png   loss, learning rate and evaluation curves
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clipforge.atomic import atomic_path
from clipforge.checkpoint import save_model
from clipforge.train import locked, optim
from clipforge.train.build import initial_model
from clipforge.train.config import TrainConfig
from clipforge.train.dist import DistInfo, barrier, init_distributed, mean_across
from clipforge.train.state import Position, restore, resume_state, rng_state, save_state
from clipforge.train.step import forward_backward, to_device

LoaderFactory = Callable[..., Any]  # clipforge.data.loader.build_loader's signature


def train(
    cfg: TrainConfig,
    *,
    loader_factory: LoaderFactory | None = None,
    captions: Sequence[str] | None = None,
    stop_after: int | None = None,
) -> Path:
    """Train (or fine-tune, or resume) as `cfg` says and return the run directory.

    `loader_factory` defaults to clipforge.data.loader.build_loader; `captions` to the training captions (read
    from `cfg.data`) for the vocabulary of a run from scratch. `stop_after` stops cleanly after that many steps
    in this call, leaving a checkpoint to resume from, as an interrupted run would."""
    info = init_distributed(cfg.device)
    _check_precision(cfg, info)
    run = Path(cfg.out)
    log = _logger(run, info)
    model, tok, pretrained = initial_model(cfg, run, captions, info.is_main, lambda: barrier(info))
    model = _prepare(model, cfg, info.device, tok)
    opt = _optimizer(model, cfg, pretrained)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    pos = _maybe_resume(cfg, run, info, model, opt, scaler, log)
    # Locked towers: a module that runs their heads on trunk outputs, and batches that carry those outputs.
    ctx = locked.Context(
        cfg, model, tok, info.is_main, lambda: barrier(info), log, info.rank, info.world_size
    )
    module, make_loader = locked.setup(ctx, _loader_maker(cfg, info, model, tok, loader_factory))
    wrapped = _wrap(module, cfg, info)
    steps_per_epoch = _steps_per_epoch(make_loader, pos, cfg, info)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    _start_run(run, cfg, info, log, total, steps_per_epoch)
    amp = torch.autocast(info.device.type, dtype=_AMP[cfg.precision], enabled=cfg.precision != "fp32")
    bar = _progress(cfg, info, total, pos.step)
    metrics = _Metrics(run, info.is_main)
    metrics.drop_after(pos.step, log)
    done_here, last_eval_step, rate = 0, -1, _Rate(cfg.batch_size * info.world_size)
    feed = _Feed(make_loader, pos, steps_per_epoch, log)
    for epoch, index, (images, tokens) in feed:
        if pos.step >= total:
            break
        lr = optim.lr_at(pos.step, base=cfg.lr, total=total, warmup=cfg.warmup_steps, minimum=cfg.min_lr)
        optim.set_lr(opt, lr)
        loss = _step(wrapped, model, opt, scaler, amp, images, tokens, cfg, info.device)
        pos, done_here = Position(pos.step + 1, epoch, index + 1), done_here + 1
        samples_per_s = rate.tick()
        if pos.step % cfg.log_every == 0 or pos.step == total:
            _log_step(metrics, bar, model, pos, mean_across(loss, info), lr, samples_per_s)
        bar.update(1)
        end_of_epoch = index + 1 == steps_per_epoch
        stopping = pos.step == total or (stop_after is not None and done_here >= stop_after)
        if end_of_epoch or pos.step == total:
            _end_of_epoch(cfg, info, model, tok, metrics, pos, log)
            last_eval_step = pos.step
        if end_of_epoch or stopping:
            _report_bad_samples(feed.loader, epoch, info, log)
        if pos.step % cfg.checkpoint_every == 0 or stopping:
            _checkpoint(run, pos, cfg, info, model, opt, scaler)
        if stopping:
            break
    bar.close()
    if pos.step >= total and info.is_main:
        _save_final(run, model, tok, pos.step, last_eval_step, log)
    _finish(info, log)
    return run


_AMP = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_precision(cfg: TrainConfig, info: DistInfo) -> None:
    if cfg.precision == "fp16" and info.device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, pretrained: Any) -> torch.optim.Optimizer:
    groups = optim.param_groups(
        model,
        weight_decay=cfg.weight_decay,
        pretrained=pretrained,
        pretrained_lr_scale=cfg.pretrained_lr_scale,
    )
    return optim.build_optimizer(model, groups, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps)


def _steps_per_epoch(make_loader, pos: Position, cfg: TrainConfig, info: DistInfo) -> int:
    steps = len(make_loader(pos.epoch, 0))
    if steps == 0:
        raise ValueError(
            f"{cfg.data}: no full batch of {cfg.batch_size} x {info.world_size} ranks in the data"
        )
    return steps


def _start_run(
    run: Path, cfg: TrainConfig, info: DistInfo, log: logging.Logger, total: int, steps_per_epoch: int
) -> None:
    """Write the resolved config into the run and say what the run will do."""
    if not info.is_main:
        return
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log.info(
        "run %s: %d steps of %d x %d, %d steps per epoch",
        run,
        total,
        cfg.batch_size,
        info.world_size,
        steps_per_epoch,
    )


def _step(wrapped, model, opt, scaler, amp, images, tokens, cfg: TrainConfig, device) -> torch.Tensor:
    """One optimiser step on one global batch (its micro-batches accumulated); returns the loss."""
    loss = forward_backward(
        wrapped,
        to_device(images, device),
        to_device(tokens, device),
        loss=cfg.loss,
        local_loss=cfg.local_loss,
        accum_steps=cfg.accum_steps,
        autocast=amp,
        backward=lambda t: scaler.scale(t).backward(),
    )
    _optimizer_step(model, opt, scaler, cfg.grad_clip)
    return loss


class _Rate:
    """Samples per second over the last step (the time since the previous tick, loading included)."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples, self.last = samples_per_step, time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        rate, self.last = self.samples / max(now - self.last, 1e-9), now
        return rate


def _log_step(metrics, bar, model, pos: Position, loss: float, lr: float, samples_per_s: float) -> None:
    metrics.write(
        step=pos.step,
        epoch=pos.epoch,
        loss=loss,
        lr=lr,
        samples_per_s=samples_per_s,
        logit_scale=float(model.scale().detach()),
    )
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")


def _save_final(run: Path, model, tok, step: int, last_eval_step: int, log: logging.Logger) -> None:
    save_model(model, run / "final", tokenizer=tok, extra={"training": {"steps": step, "run": str(run)}})
    log.info("final model saved to %s (last evaluation at step %d)", run / "final", last_eval_step)
    _plot(run, log)


def _finish(info: DistInfo, log: logging.Logger) -> None:
    barrier(info)
    _close(log)
    if info.distributed:
        dist.destroy_process_group()


def _prepare(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, tok) -> torch.nn.Module:
    model = model.to(device).train()
    locked.lock_towers(model, cfg, tok)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    _train_mode(model, cfg)
    return model


def _train_mode(model: torch.nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if cfg.lock_image and not cfg.lock_image_norm_trainable:
        optim.freeze_batchnorm_stats(model.visual)


def _wrap(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    wrapped = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _optimizer_step(model, opt, scaler, grad_clip: float | None) -> None:
    if grad_clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _loader_maker(cfg: TrainConfig, info: DistInfo, model, tok, factory: LoaderFactory | None):
    if factory is None:
        try:
            from clipforge.data.loader import build_loader as factory
        except ImportError as e:
            raise ImportError(f"clipforge.data.loader is needed to read training data ({e})") from e
    if not cfg.data:
        raise ValueError("no training data: pass data=[...] (--data PATH)")
    source = list(cfg.data) if len(cfg.data) > 1 else cfg.data[0]

    def make(epoch: int, start_batch: int, **options: Any):
        return factory(
            source,
            preprocess_cfg=model.config.preprocess,
            tokenizer=tok,
            batch_size=cfg.batch_size,
            train=True,
            rank=info.rank,
            world_size=info.world_size,
            workers=cfg.workers,
            seed=cfg.seed,
            epoch=epoch,
            max_bad_fraction=cfg.max_bad_fraction,
            samples_per_epoch=cfg.samples_per_epoch,
            start_batch=start_batch,
            **options,
        )

    return make


class _Feed:
    """(epoch, batch index within it, batch) from the saved data position onwards, epoch after epoch.
    `loader` is the current epoch's loader (its `stats` count the bad samples read so far); a loader
    that fails (too many bad samples) is reported in the run log before the error ends the run."""

    def __init__(self, make, pos: Position, steps_per_epoch: int, log: logging.Logger) -> None:
        self.make, self.pos, self.steps_per_epoch, self.log = make, pos, steps_per_epoch, log
        self.loader: Any = None

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        epoch, start = self.pos.epoch, self.pos.batch
        while True:
            if start < self.steps_per_epoch:
                self.loader = self.make(epoch, start)
                try:
                    for index, batch in enumerate(self.loader, start):
                        yield epoch, index, batch
                except Exception as e:
                    self.log.error("epoch %d: reading the training data failed: %s", epoch, e)
                    raise
            epoch, start = epoch + 1, 0


def _report_bad_samples(loader, epoch: int, info: DistInfo, log: logging.Logger) -> None:
    """The one place bad samples reach the run log: per epoch (and at a stop), how many every rank's loader
    skipped and why for the first few (each loader's `stats` already add up its worker processes)."""
    from clipforge.data.batches import MAX_EXAMPLES

    stats = getattr(loader, "stats", None)  # a custom loader may keep none
    mine = (getattr(stats, "seen", 0), getattr(stats, "bad", 0), list(getattr(stats, "examples", ())))
    every = [mine]
    if info.distributed:  # every rank calls this at the same step
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
    bad = sum(b for _, b, _ in every)
    if bad and info.is_main:
        examples = [x for _, _, xs in every for x in xs][:MAX_EXAMPLES]
        log.warning(
            "epoch %d: skipped %d bad of %d samples read; the first %d: %s",
            epoch,
            bad,
            sum(s for s, _, _ in every),
            len(examples),
            "; ".join(examples),
        )


def _maybe_resume(cfg, run: Path, info: DistInfo, model, opt, scaler, log) -> Position:
    found = resume_state(run, cfg.resume, log.warning)
    if found is None:
        return Position(0, 0, 0)
    path, pos, state = found
    restore(path, state, model, opt, scaler, info.rank)
    if state.get("world_size", info.world_size) != info.world_size:
        log.warning(
            "resuming a %s-rank run on %s ranks: the data order changes", state["world_size"], info.world_size
        )
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, pos.step, pos.epoch, pos.batch)
    return pos


def _checkpoint(run: Path, pos: Position, cfg, info: DistInfo, model, opt, scaler) -> None:
    rngs = [rng_state()]
    if info.distributed:
        rngs = [None] * info.world_size
        dist.all_gather_object(rngs, rng_state())
    if info.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rngs,
            "world_size": info.world_size,
            "config": json.dumps(cfg.to_dict()),
        }
        save_state(run, pos, state, keep=cfg.keep_checkpoints)


def _end_of_epoch(cfg, info: DistInfo, model, tok, metrics, pos: Position, log) -> None:
    if info.is_main and cfg.eval_data:
        from clipforge.encoder import Encoder
        from clipforge.train.evaluate import evaluate
        from clipforge.transforms import Preprocess

        model.eval()
        with torch.no_grad():
            result = evaluate(Encoder(model, Preprocess(model.config.preprocess), tok), cfg.eval_data)
        _train_mode(model, cfg)
        metrics.write(step=pos.step, epoch=pos.epoch, eval=result)
        log.info("step %d evaluation: %s", pos.step, json.dumps(result))
    barrier(info)


class _Metrics:
    def __init__(self, run: Path, enabled: bool):
        self.path, self.enabled = run / "metrics.jsonl", enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def drop_after(self, step: int, log: logging.Logger) -> None:
        """Drop the records past `step` (and lines torn by a kill): a run resumed from step `step` redoes
        those steps and writes them again, so the steps stay in order and are written once each."""
        if not (self.enabled and self.path.is_file()):
            return
        dropped = 0
        with atomic_path(self.path) as tmp, open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for line in src:
                at = _record_step(line)
                if at is None or at > step:
                    dropped += bool(line.strip())
                else:
                    dst.write(line.rstrip(b"\n") + b"\n")  # a last line may lack its newline
        if dropped:
            log.info("metrics.jsonl: dropped %d record(s) past step %d, which this run redoes", dropped, step)


def _record_step(line: bytes) -> int | None:
    """The step of a metrics line; None for a torn or foreign one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else None


def _progress(cfg: TrainConfig, info: DistInfo, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not (cfg.progress and info.is_main),
        unit="step",
        dynamic_ncols=True,
    )


def _logger(run: Path, info: DistInfo) -> logging.Logger:
    """The run's log: everything to run/log.txt, warnings also to the console (rank 0 only)."""
    log = logging.getLogger(f"clipforge.train.{id(run)}")
    _close(log)  # handlers left by an earlier run that raised, under a recycled id
    log.setLevel(logging.INFO)
    log.propagate = False
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("clipforge train: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.addHandler(console)
    else:  # other ranks stay quiet (Python would print their warnings on stderr)
        log.addHandler(logging.NullHandler())
    return log


def _close(log: logging.Logger) -> None:
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)


def _plot(run: Path, log: logging.Logger) -> None:
    with contextlib.suppress(ImportError):
        from clipforge.train.plot import plot_run

        log.info("curves drawn to %s", plot_run(run))
