"""Resumable training state: checkpoints/step-N/state.pt, written atomically, the last K kept.

A checkpoint holds the model, the optimiser (its moments and per-group settings), the loss scaler, every RNG
and the data position (epoch, batches consumed in it); the learning rate is a function of the step. It is
written to a temporary directory that is renamed into place only when complete, so a process killed at any
moment leaves either the previous checkpoints or the new one, never half of one. A SHA-256 of state.pt is
written beside it: a file damaged later (a truncated copy, a full disk, bit rot) is refused instead of
resuming with wrong numbers, and `resume_state` falls back to the newest checkpoint that reads cleanly.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
CHECKSUM_FILE = "state.sha256"  # hex SHA-256 of STATE_FILE
_STEP_DIR = re.compile(r"step-([0-9]+)")
# What a state file must hold, with the type of each entry (rng: one state per rank).
_ENTRIES: dict[str, type] = {"position": list, "model": dict, "optimizer": dict, "scaler": dict, "rng": list}


class ResumeError(ValueError):
    """A training checkpoint that cannot be resumed from (missing, truncated, damaged, not a training state,
    or made for another model); the message names it and says why."""


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
    """Checkpoint directories of a run (checkpoints/step-N), oldest first; `load_state` says if one is
    damaged."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if _step_of(d) is not None and d.is_dir()), key=_step_of)


def _step_of(d: Path) -> int | None:
    m = _STEP_DIR.fullmatch(d.name)
    return int(m.group(1)) if m else None


def save_state(run: Path, pos: Position, state: dict[str, Any], keep: int) -> Path:
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{pos.step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{pos.step}."))
    try:
        payload = {**state, "position": [pos.step, pos.epoch, pos.batch]}
        torch.save(payload, tmp / STATE_FILE)
        _fsync(tmp / STATE_FILE)
        (tmp / CHECKSUM_FILE).write_text(_digest(tmp / STATE_FILE) + "\n")
        _fsync(tmp / CHECKSUM_FILE)
        if final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Keep the last `keep` up to this step. Later ones (left by a run that fell back past a damaged
    # checkpoint, or resumed from an earlier one) are not counted: they must not push this one out.
    upto = [d for d in step_dirs(run) if (_step_of(d) or 0) <= pos.step]
    for old in upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync(path: Path) -> None:
    """On disk before the rename publishes the checkpoint."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # read in chunks


def load_state(path: Path) -> tuple[Position, dict[str, Any]]:
    """(data position, state) of a checkpoint directory or state file; ResumeError if it cannot be used."""
    f = path / STATE_FILE if path.is_dir() else path
    if not f.is_file():
        raise ResumeError(f"{path}: no resumable state (expected a {STATE_FILE} file)")
    if f.stat().st_size == 0:
        raise ResumeError(f"{f}: empty file (0 bytes)")
    try:
        _verify(f)
        # Only tensors, numbers, strings and containers: loadable without unpickling arbitrary objects.
        state = torch.load(f, map_location="cpu", weights_only=True)
    except ResumeError:
        raise
    except Exception as e:  # torch.load fails with a different type for each kind of damage
        raise ResumeError(f"{f}: unreadable, truncated or not a PyTorch file ({_reason(e)})") from None
    return _unpack(state, f)


def _verify(f: Path) -> None:
    """Compare with the checksum written at save time; a state file without one (written by an older
    clipforge) is read unverified."""
    sums = f.parent / CHECKSUM_FILE
    if not sums.exists():
        return
    try:
        expected = sums.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ResumeError(f"{sums}: unreadable checksum ({_reason(e)})") from None
    if _digest(f) != expected:  # an OSError reading the state file is reported by load_state
        raise ResumeError(f"{f}: damaged (its SHA-256 differs from the one written with it in {sums.name})")


def _unpack(state: Any, f: Path) -> tuple[Position, dict[str, Any]]:
    if not isinstance(state, dict):
        raise ResumeError(f"{f}: not a training state (a {type(state).__name__}, expected a dict)")
    wrong = [k for k, t in _ENTRIES.items() if not isinstance(state.get(k), t)]
    if wrong:
        raise ResumeError(f"{f}: not a training state (missing or malformed: {', '.join(wrong)})")
    position = state.pop("position")
    if len(position) != 3 or not all(type(v) is int and v >= 0 for v in position):
        raise ResumeError(f"{f}: malformed data position {position!r:.80}")
    if not state["rng"]:
        raise ResumeError(f"{f}: no RNG state")
    return Position(*position), state


def _reason(e: BaseException) -> str:
    """An exception in one bounded line (torch's messages run over several, with advice we do not need)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def resume_state(
    run: Path, resume: str, warn: Callable[[str], None]
) -> tuple[Path, Position, dict[str, Any]] | None:
    """(checkpoint, position, state) to resume from: none ('never'), an explicit checkpoint (ResumeError
    if it cannot be used), or ('auto') the run's newest checkpoint that reads cleanly, calling `warn` for
    each newer one skipped; ResumeError if the run has checkpoints and none is readable."""
    if resume == "never":
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.exists():
            raise ResumeError(f"resume checkpoint not found: {p}")
        return (p, *load_state(p))
    skipped = []
    for d in reversed(step_dirs(run)):
        try:
            return (d, *load_state(d))
        except ResumeError as e:
            warn(f"skipping checkpoint {d.name}, it cannot be resumed from: {e}")
            skipped.append(str(e))
    if skipped:
        raise ResumeError(f"no readable checkpoint in {run / 'checkpoints'}: " + "; ".join(skipped))
    return None


def restore(path: Path, state: dict[str, Any], model, optimizer, scaler, rank: int) -> None:
    """Load `state` (from `load_state(path)`) into the model, optimiser, loss scaler and this rank's RNGs;
    ResumeError naming `path` when it does not fit them (a checkpoint of another model or optimiser)."""
    rngs = state["rng"]
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ResumeError(f"{path}: does not fit this run ({_reason(e)})") from None
