"""Small helpers the sub-command modules share: model flags and JSON/text output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def add_model_flags(p: argparse.ArgumentParser, required: bool = False, fast: bool = False) -> None:
    """--model, --vocab, --device; with `fast`, also the inference fast-path flags (add_fast_flags)."""
    p.add_argument(
        "--model",
        "-m",
        default=None if required else "default",
        required=required,
        help="checkpoint: a clipforge/Hugging Face/OpenCLIP directory, an OpenAI or OpenCLIP file, or 'default'",
    )
    p.add_argument(
        "--vocab", default=None, help="vocabulary file or directory, for checkpoints that carry none"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    if fast:
        add_fast_flags(p)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of clipforge.load / Encoder.load that add_model_flags collected."""
    options = {"vocab": args.vocab, "device": args.device}
    if hasattr(args, "channels_last"):
        options.update(
            precision=args.precision,
            compile=args.compile,
            channels_last=channels_last_arg(args.channels_last),
        )
    return options


def add_long_flag(p: argparse.ArgumentParser) -> None:
    """--long: how texts past the model's context length are read (clipforge.long_text)."""
    from clipforge.long_text import LONG_STRATEGIES

    p.add_argument(
        "--long",
        choices=LONG_STRATEGIES,
        default="truncate",
        help="texts past the context length: truncate (default), chunk (average of overlapping windows) or "
        "interpolate (Long-CLIP's stretched positions)",
    )


def add_fast_flags(p: argparse.ArgumentParser) -> None:
    """Inference fast-path flags, mapping onto clipforge.load(precision=, compile=, channels_last=)."""
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "int8"],
        default="fp32",
        help="fp32 (exact), bf16 (autocast) or int8 (CPU, int8 linear layers); see docs/speed.md",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the towers (slow first call)")
    p.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="NHWC convolutions for ResNet image towers (auto: on for ResNet)",
    )


def channels_last_arg(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    """Print `obj` as JSON (with --json, or when there is no text form), else `text`."""
    print(to_json(obj) if as_json or text is None else text)


def to_json(obj: Any) -> str:
    """Strict JSON, which has no NaN or infinity: such numbers become null, with a warning on stderr naming
    where the first one was, so that every --json output parses with any JSON reader."""
    found: list[str] = []
    text = json.dumps(_finite_or_null(obj, "", found), indent=2, allow_nan=False)
    if found:
        print(
            f"clipforge: warning: {len(found)} NaN or infinite number(s) written as null, the first at {found[0]}",
            file=sys.stderr,
        )
    return text


def _finite_or_null(obj: Any, where: str, found: list[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(where or "the top level")
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj
