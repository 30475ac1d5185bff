"""`clipforge plot RUN`: the loss, learning-rate and evaluation curves of a run, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run}: not a training run directory")
    records = []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n != len(lines):  # a last line cut by a crash is expected
                    raise ValueError(f"{path}:{n}: not JSON") from None
    return records


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, float) and ("R@" in k or k.startswith("top") or "recall" in k):
            out[prefix + k] = float(v)
    return out


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the curves (evaluation: recall@k, top-k accuracy and per-class recall) to `out` (default RUN/plots/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    evals = [(r["step"], _flatten(r["eval"])) for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        for name in sorted({k for _, e in evals for k in e}):
            pts = [(s, e[name]) for s, e in evals if name in e]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        axes[2].set(title="held-out evaluation", xlabel="step")
        axes[2].legend(fontsize="small")
    fig.tight_layout()
    path = Path(out) if out is not None else Path(run) / "plots" / "curves.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
