"""Resumable training state: checkpoints/step-N/state.pt, written atomically, the last K kept.

A checkpoint holds the model, the optimiser (its moments and per-group settings), the loss scaler, every RNG
and the data position (epoch, batches consumed in it); the learning rate is a function of the step. It is
written to a temporary directory that is renamed into place only when complete, so a process killed at any
moment leaves either the previous checkpoints or the new one, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Position:
    step: int  # optimiser steps done
    epoch: int  # the epoch the next batch comes from
    batch: int  # batches of that epoch already consumed


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    # random.setstate wants tuples; a reloaded state may come back with lists inside.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def step_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if (d / STATE_FILE).is_file() and d.name[5:].isdigit()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def save_state(run: Path, pos: Position, state: dict[str, Any], keep: int) -> Path:
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{pos.step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{pos.step}."))
    try:
        payload = {**state, "position": [pos.step, pos.epoch, pos.batch]}
        torch.save(payload, tmp / STATE_FILE)
        with open(tmp / STATE_FILE, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in step_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> tuple[Position, dict[str, Any]]:
    f = path / STATE_FILE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"no resumable state at {path} (expected {STATE_FILE})")
    # Only tensors, numbers, strings and containers: loadable without unpickling arbitrary objects.
    state = torch.load(f, map_location="cpu", weights_only=True)
    step, epoch, batch = state.pop("position")
    return Position(int(step), int(epoch), int(batch)), state


def find_resume(run: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: the run's latest ('auto'), none ('never'), or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        dirs = step_dirs(run)
        return dirs[-1] if dirs else None
    p = Path(resume)
    if not p.exists():
        raise FileNotFoundError(f"resume checkpoint not found: {p}")
    return p
