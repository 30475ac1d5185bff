"""Pictures and a Markdown page beside every evaluation's JSON.

- similarity: cosine similarities of a sample of images (thumbnails along the top) and captions (rows), as
  in figure 21 of the CLIP paper;
- confusion: the row-normalised confusion matrix;
- per_class: per-class recall (accuracy), worst classes at the top;
- mistakes: the most confident wrong predictions as thumbnails, true and predicted label under each.

matplotlib is imported inside the functions (the `eval` extra) and always with the non-interactive backend.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _thumb(image: Any, size: int = 96) -> np.ndarray:
    from clipforge.transforms import load_image

    img = load_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return np.asarray(canvas)


def plot_similarity(images: Sequence[Any], captions: Sequence[str], sims: np.ndarray, path: Path) -> Path:
    """sims: (n_captions, n_images) cosine similarities; images drawn above their columns."""
    plt = _plt()
    n_cap, n_img = sims.shape
    fig = plt.figure(figsize=(2.0 + 1.0 * n_img + 2.8, 1.3 + 0.55 * n_cap))
    height = 1.3 + 0.55 * n_cap
    top = 1.0 - 1.15 / height  # room above the matrix for the thumbnails
    left, width = 3.0 / (n_img + 4.8), n_img / (n_img + 4.8)
    ax = fig.add_axes([left, 0.02, width, top - 0.04])
    im = ax.imshow(sims, cmap="viridis", aspect="auto", vmin=float(sims.min()), vmax=float(sims.max()))
    for i in range(n_cap):
        for j in range(n_img):
            v = sims[i, j]
            bright = (v - sims.min()) / max(float(np.ptp(sims)), 1e-9) > 0.6
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if bright else "white"
            )
    ax.set_yticks(range(n_cap), [textwrap.shorten(c, 40) for c in captions], fontsize=8)
    ax.set_xticks([])
    for j, img in enumerate(images):
        tax = fig.add_axes([left + width * j / n_img, top, width / n_img, 1.0 / height], anchor="S")
        tax.imshow(_thumb(img))
        tax.axis("off")
    cax = fig.add_axes([left + width + 0.02, 0.1, 0.015, top - 0.2])
    fig.colorbar(im, cax=cax, label="cosine similarity")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """cm: (C, C) counts, rows = true class, columns = predicted; drawn row-normalised."""
    plt = _plt()
    c = len(classes)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.35 * c + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if c <= 40:
        ax.set_xticks(range(c), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(c), classes, fontsize=7)
    if c <= 25:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    color = "white" if rows[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(recall: dict[str, float], path: Path, max_classes: int = 60) -> Path:
    """Horizontal bars, worst classes first; beyond `max_classes` only the worst are drawn."""
    plt = _plt()
    items = sorted(recall.items(), key=lambda kv: (kv[1], kv[0]))[:max_classes]
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.24 * len(items)))
    ax.barh(range(len(items)), [v for _, v in items], color="#4c72b0")
    ax.set_yticks(range(len(items)), [k for k, _ in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("recall (accuracy on the class)")
    shown = "" if len(recall) <= max_classes else f" (worst {max_classes} of {len(recall)})"
    ax.set_title(f"per-class accuracy{shown}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mistakes(mistakes: Sequence[tuple[Any, str, str, float]], path: Path, cols: int = 6) -> Path:
    """(image, true label, predicted label, confidence) tuples, most confident first."""
    plt = _plt()
    n = max(len(mistakes), 1)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, true, pred, conf) in zip(axes.flat, mistakes):
        ax.imshow(_thumb(img, 128))
        ax.set_title(
            f"true: {textwrap.shorten(true, 22)}\npred: {textwrap.shorten(pred, 22)} ({conf:.2f})", fontsize=7
        )
    if not mistakes:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def write_report(
    out_dir: Path, name: str, title: str, metrics: dict[str, Any], pictures: dict[str, Path], notes: str = ""
) -> Path:
    """`<name>.json` (the metrics) and `<name>.md` (metrics table, notes and the pictures) in out_dir."""
    (out_dir / f"{name}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        if isinstance(v, (int, float, str)):
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if notes:
        lines += ["", notes]
    for caption, p in pictures.items():
        lines += ["", f"## {caption}", "", f"![{caption}]({p.name})"]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def classification_pictures(
    out_dir: Path,
    name: str,
    classes: Sequence[str],
    targets: np.ndarray,
    probs: np.ndarray,
    images: Sequence[Any],
    max_mistakes: int = 12,
) -> dict[str, Path]:
    """Confusion matrix, per-class accuracy and top mistakes of a classifier's (N, C) probabilities."""
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(targets, preds, len(classes))
    present = [c for c in range(len(classes)) if cm[c].sum()]
    recall = {classes[c]: float(cm[c, c] / cm[c].sum()) for c in present}
    wrong = np.flatnonzero(preds != targets)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:max_mistakes]
    mistakes = [(images[i], classes[targets[i]], classes[preds[i]], float(probs[i, preds[i]])) for i in wrong]
    return {
        "Confusion matrix": plot_confusion(cm, classes, out_dir / f"{name}_confusion.png"),
        "Per-class accuracy": plot_per_class(recall, out_dir / f"{name}_per_class.png"),
        "Top mistakes": plot_mistakes(mistakes, out_dir / f"{name}_mistakes.png"),
    }
