"""Training sub-commands: train, plot. The `train` flags are generated from TrainConfig's fields and their help
text, so every option is documented in `--help` and there is no second list to keep in step."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from clipforge.loss import LOSSES
from clipforge.train.config import PRESETS, TRAIN_PRECISIONS, TrainConfig, field_types

CHOICES = {"loss": LOSSES, "precision": TRAIN_PRECISIONS}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CLIP model (from scratch, or fine-tune with --init); resumes a run automatically",
        description="Train a CLIP model. Options not given come from --config, then from TrainConfig's defaults. "
        "Distributed: torchrun --nproc_per_node=K -m clipforge train ...",
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"a named config ({', '.join(PRESETS)}) or a JSON file of training options",
    )
    _add_config_flags(p)
    p.set_defaults(run=lambda a: train_command(a.config, _overrides(a)))

    p = sub.add_parser("plot", help="draw a run's loss, learning-rate and evaluation curves to a PNG")
    p.add_argument("run_dir", metavar="RUN", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/plots/curves.png)")
    p.set_defaults(run=lambda a: plot_command(a.run_dir, a.out))


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    types = field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {_show(f.default)})"
        kind = types[f.name]
        if kind is bool:
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif f.name == "data":
            p.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="PATH", help=help_text)
        else:
            choices = CHOICES.get(f.name)
            p.add_argument(
                flag, dest=f.name, type=_parser(kind), choices=choices, default=None, help=help_text
            )


def _parser(kind: type):
    if kind is float:
        # "none" turns an optional number off (e.g. --grad-clip none)
        return lambda s: None if s.lower() == "none" else float(s)
    return kind


def _show(v: Any) -> str:
    return "none" if v is None or v == () else str(v)


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def train_command(config: str | None, overrides: dict[str, Any]) -> int:
    from clipforge.train import load_config, train

    cfg = load_config(config, **overrides)
    run = train(cfg)
    print(f"run: {run}\nfinal model: {run / 'final'}")
    return 0


def plot_command(run: str, out: str | None) -> int:
    from clipforge.train.plot import plot_run

    print(plot_run(run, out))
    return 0
