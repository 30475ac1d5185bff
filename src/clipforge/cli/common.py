"""Small helpers the sub-command modules share: model flags and JSON/text output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_model_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
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


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def emit(obj: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text if text is not None else json.dumps(obj, indent=2))
