"""Training sub-commands: train, train-multilingual, plot. The `train` flags are generated from TrainConfig's fields and their help
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

    _register_multilingual(sub)

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


def _register_multilingual(sub: argparse._SubParsersAction) -> None:
    from clipforge.multilingual import DistillConfig

    d = DistillConfig()
    p = sub.add_parser(
        "train-multilingual",
        help="distil a multilingual text tower from a model's BERT-family text tower (docs/multilingual.md)",
        description="Distil a student text tower that reads 28 languages (emojibase's CLDR names, split by the "
        "corpus's concepts) from TEACHER's text tower, and write TEACHER with that tower to OUT (by default "
        "the model `default-multilingual` names). With --student, only assemble a saved student with TEACHER.",
    )
    p.add_argument("--teacher", required=True, metavar="MODEL", help="model directory (or 'default')")
    p.add_argument(
        "--out", default=None, help="output model directory (default: the default-multilingual one)"
    )
    p.add_argument("--corpus", default=None, help="open corpus folder (default: the cache's)")
    p.add_argument(
        "--student", default=None, metavar="DIR", help="reuse a saved student (OUT/student of a run)"
    )
    p.add_argument(
        "--minutes", type=float, default=d.max_minutes, help="training time limit (default: %(default)s)"
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help="at most this many steps (default: %(default)s)"
    )
    for name in ("width", "layers", "heads", "vocab_size", "batch_size"):
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, type=int, default=getattr(d, name), help=f"student {name} (default: %(default)s)"
        )
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument(
        "--from-teacher",
        action=argparse.BooleanOptionalAction,
        default=d.from_teacher,
        help="start from the teacher's first --layers layers, with its vocabulary extended by the other "
        "locales' tokens (width and heads are then the teacher's) (default: %(default)s)",
    )
    p.add_argument(
        "--new-tokens-only",
        action=argparse.BooleanOptionalAction,
        default=d.new_tokens_only,
        help="with --from-teacher and all its layers: train only the added tokens' embeddings, so plain English "
        "embeds exactly as the teacher embeds it (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_multilingual_command)


def _multilingual_command(a: argparse.Namespace) -> int:
    from clipforge import paths
    from clipforge.checkpoint import resolve
    from clipforge.multilingual import DistillConfig, assemble_dir, train_multilingual

    teacher = resolve(a.teacher)
    if a.student is not None:
        out = assemble_dir(teacher, a.student, a.out or paths.multilingual_model_dir())
    else:
        cfg = DistillConfig(
            width=a.width,
            layers=a.layers,
            heads=a.heads,
            vocab_size=a.vocab_size,
            batch_size=a.batch_size,
            lr=a.lr,
            steps=a.steps,
            max_minutes=a.minutes,
            from_teacher=a.from_teacher,
            new_tokens_only=a.new_tokens_only,
        )
        out = train_multilingual(teacher, a.out, a.corpus, cfg, progress=not a.no_progress)
    print(f"multilingual model: {out}")
    return 0
