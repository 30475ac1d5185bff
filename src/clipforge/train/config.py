"""TrainConfig: every knob of a training run in one frozen, typed dataclass.

A run is described by a named preset (`PRESETS`) or a JSON file of TrainConfig fields, then overridden field by
field (the command line's flags are generated from the fields below, with their help text, so `--help` always
lists every option). The resolved config is written to the run directory as config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.loss import LOSSES

TRAIN_PRECISIONS = ("fp32", "bf16", "fp16")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # --- data and run directory
    data: tuple[str, ...] = _opt((), "training data: manifests (JSONL/CSV/TSV), image folders or .tar shards")
    eval_data: str | None = _opt(
        None, "held-out manifest for zero-shot and retrieval evaluation at epoch ends"
    )
    out: str = _opt("runs/run", "run directory: config, log, metrics, plots, checkpoints and the final model")
    workers: int = _opt(2, "data loader worker processes per rank")
    max_bad_fraction: float = _opt(0.01, "fail if more than this fraction of samples is unreadable")
    samples_per_epoch: int | None = _opt(None, "samples per epoch; none: one pass over the data")
    # --- model and tokenizer
    model: str = _opt(
        "tiny", "architecture for a run from scratch: a preset name or a JSON file of a model config"
    )
    image_size: int | None = _opt(None, "override the preset's image size (a multiple of its patch size)")
    context_length: int | None = _opt(
        None,
        "text context length; with --init the checkpoint's position embeddings are stretched to it "
        "(Long-CLIP: 248 from 77); none: the preset's or checkpoint's",
    )
    vocab_size: int | None = _opt(None, "vocabulary size to train on the captions; none: the preset's")
    vocab: str | None = _opt(None, "use this tokenizer (directory or OpenAI .txt.gz) instead of training one")
    init: str | None = _opt(None, "fine-tune: start from this checkpoint (anything clipforge.load reads)")
    towers: str | None = _opt(
        None,
        "start the preset's towers from pretrained weights in this folder ('auto': the cache's, filled by "
        "`clipforge data fetch-towers`); the projections start new, from --seed",
    )
    # --- schedule
    epochs: int = _opt(1, "passes over the data")
    steps: int | None = _opt(None, "total optimiser steps; overrides epochs")
    batch_size: int = _opt(64, "images per rank per optimiser step (global batch = batch_size x ranks)")
    accum_steps: int = _opt(
        1, "split each rank's batch into this many micro-batches (less memory, same contrastive loss)"
    )
    lr: float = _opt(5e-4, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "linear warm-up steps")
    weight_decay: float = _opt(0.2, "AdamW weight decay (never on gains, biases, embeddings, logit scale)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    grad_clip: float | None = _opt(1.0, "clip the gradient's global norm to this (None: no clipping)")
    # --- loss
    loss: str = _opt("clip", "'clip' (symmetric InfoNCE) or 'sigmoid' (SigLIP)")
    local_loss: bool = _opt(False, "each rank computes only its rows of the logits (less memory, same loss)")
    # --- speed and memory
    precision: str = _opt("fp32", "fp32, bf16 (autocast) or fp16 (autocast + loss scaling, CUDA only)")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    compile: bool = _opt(False, "torch.compile the model (slow first step)")
    device: str = _opt("auto", "auto (CUDA if present), cpu, cuda")
    # --- fine-tuning
    lock_image: bool = _opt(
        False, "lock the image tower (LiT): all but its head (projection and unlocked top blocks) is frozen"
    )
    lock_image_norm_trainable: bool = _opt(
        False, "with lock_image: keep its normalisation layers trainable (then nothing is cached)"
    )
    unlock_image_blocks: int = _opt(0, "with lock_image: train the image tower's top N blocks too")
    lock_text: bool = _opt(
        False, "lock the text tower: all but its head (projection and unlocked top blocks)"
    )
    unlock_text_blocks: int = _opt(0, "with lock_text: train the text tower's top N blocks too")
    lock_text_head: bool = _opt(
        False,
        "with lock_text: freeze the text projection too, so the joint space is the text tower's own (a new "
        "projection starts as the identity: embed_dim must equal the text width)",
    )
    feature_cache: str = _opt(
        "auto",
        "where a locked tower's trunk outputs are cached: a directory, 'auto' (the clipforge cache), or 'off' "
        "(compute them every step; slow, to check the cache)",
    )
    pretrained_lr_scale: float = _opt(1.0, "learning-rate multiplier for weights loaded by --init")
    # --- bookkeeping
    seed: int = _opt(0, "seed of the model initialisation, data order and augmentation")
    log_every: int = _opt(10, "write metrics every this many steps")
    checkpoint_every: int = _opt(500, "save resumable state every this many steps (and at the end)")
    keep_checkpoints: int = _opt(2, "keep the last this many resumable checkpoints")
    resume: str = _opt("auto", "auto (resume from the run's latest checkpoint if any), never, or a step dir")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):
            object.__setattr__(self, "data", (str(self.data),))
        object.__setattr__(self, "data", tuple(_expand(d) for d in self.data))
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", _expand(self.eval_data))
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("precision", self.precision, TRAIN_PRECISIONS)
        for name in (
            "batch_size",
            "accum_steps",
            "epochs",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}"
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        for side in ("image", "text"):
            n = getattr(self, f"unlock_{side}_blocks")
            if n < 0 or (n and not getattr(self, f"lock_{side}")):
                raise ValueError(f"unlock_{side}_blocks={n} needs lock_{side} and must be >= 0")
        if self.lock_text_head and not (self.lock_text and self.unlock_text_blocks == 0):
            raise ValueError("lock_text_head needs lock_text and no unlocked text blocks")
        if self.warmup_steps < 0 or self.lr <= 0 or self.pretrained_lr_scale < 0:
            raise ValueError("warmup_steps must be >= 0, lr > 0 and pretrained_lr_scale >= 0")

    def replace(self, **changes: Any) -> TrainConfig:
        _check_keys(changes, "config override")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        _check_keys(d, "training config")
        return cls(**d)


# Named configurations. `tiny` is the CPU mode: a small ViT at 32 px that learns the synthetic shapes in minutes;
# `default` trains the default model on the open corpus; `scratch` is round 1's from-scratch recipe.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": "tiny",
        "image_size": 32,
        "vocab_size": 1024,
        "batch_size": 32,
        "epochs": 5,
        "lr": 1e-3,
        "warmup_steps": 20,
        "weight_decay": 0.1,
        "workers": 0,
        "checkpoint_every": 100,
    },
    # The default model (LiT, Zhai et al. 2022): pretrained EfficientNet-Lite0 and all-MiniLM-L6-v2 towers, the
    # text tower locked whole (its projection the identity, so the joint space is MiniLM's own 384-d sentence
    # space) and the image tower locked below a new head into it, trained from the feature cache.
    # No eval_data here: an evaluation at each of the 94 epoch ends would run both towers whole; the demo and
    # bench/default_model.py evaluate the final model. The choices, measured on held-out concepts (BENCHMARKS.md,
    # "The default model"): a trained text projection fits the training concepts and loses 5 points of
    # zero-shot top-1 on new ones; the image head reads every stage from the 4th on and a colour histogram
    # (`pool="multiscale"`) through a residual MLP, and 224 px: together about +5 top-1 and +9 text->image R@10
    # over the head convolution's features at 192 px through a linear map; lr 1e-3 (3e-3 was worse);
    # standardised features and masking duplicate captions each moved top-1 by under a point.
    "default": {
        "model": "effnet-lite0-minilm-384-ms",
        "towers": "auto",
        "image_size": 224,
        "lock_image": True,
        "lock_text": True,
        "lock_text_head": True,
        "feature_cache": "auto",
        "batch_size": 1024,
        "epochs": 94,  # 1,504 steps; a new caption of each image every epoch
        "lr": 1e-3,
        "warmup_steps": 100,
        "weight_decay": 0.2,
        "workers": 2,
        "checkpoint_every": 500,
    },
    # Round 1's default model: the tiny preset from scratch, its vocabulary trained on the captions.
    "scratch": {
        "model": "tiny",
        "vocab_size": 8192,
        "batch_size": 64,
        "epochs": 4,
        "lr": 1e-3,
        "warmup_steps": 100,
        "weight_decay": 0.1,
        "workers": 2,
        "checkpoint_every": 200,
    },
}


def load_config(name_or_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A preset name or a JSON file of TrainConfig fields (a JSON may name a `preset` to start from), then
    `overrides`. Unknown keys are errors that list the valid ones."""
    base: dict[str, Any] = {}
    if name_or_path is not None:
        base = _read(name_or_path)
    return TrainConfig.from_dict({**base, **overrides})


def _read(name_or_path: str | Path) -> dict[str, Any]:
    s = str(name_or_path)
    if s in PRESETS:
        return dict(PRESETS[s])
    p = Path(s)
    if p.suffix != ".json" and not p.exists():
        raise ValueError(
            f"unknown training config {s!r}; valid presets: {', '.join(PRESETS)}, or a .json file"
        )
    if not p.is_file():
        raise FileNotFoundError(f"training config not found: {p}")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a JSON object of training options")
    d.pop("comment", None)
    preset = d.pop("preset", None)
    return {**(_read(preset) if preset else {}), **d}


def _expand(path: str | Path) -> str:
    """`~` expanded in local paths; URLs (shards over http, pipe:) are left alone."""
    s = str(path)
    return s if "://" in s or s.startswith("pipe:") else os.path.expanduser(s)


def _check_keys(d: dict[str, Any], what: str) -> None:
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; valid keys: {sorted(valid)}")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def field_types() -> dict[str, type]:
    """Each field's scalar type (int, float, str, bool), `Optional` and tuples unwrapped: for the CLI."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            t = args[0]
        if typing.get_origin(t) is tuple:
            t = typing.get_args(t)[0]
        out[f.name] = t
    return out
