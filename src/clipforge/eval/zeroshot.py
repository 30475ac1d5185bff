"""Zero-shot classification accuracy on a labelled manifest: top-1, top-5 and mean per-class recall.

Manifest lines: {"image": "relative/path.png", "label": "class name"}. The classes are the set of labels
(sorted), or a list / file given by the caller, which may hold classes with no test image (they still
compete as wrong answers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.eval.manifest import ManifestError, read_manifest
from clipforge.zeroshot import EncoderLike, ZeroShotClassifier, as_encoder, read_labels, softmax


def topk_accuracy(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows whose target is among the k highest scores (ties broken by class order)."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def mean_per_class_recall(preds: np.ndarray, targets: np.ndarray) -> float:
    """Mean over the classes present in `targets` of the fraction of their items predicted correctly."""
    classes = np.unique(targets)
    return float(np.mean([(preds[targets == c] == c).mean() for c in classes]))


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float | int]:
    return {
        "top1": topk_accuracy(scores, targets, 1),
        "top5": topk_accuracy(scores, targets, 5),
        "mean_per_class_recall": mean_per_class_recall(scores.argmax(axis=1), targets),
        "n": int(len(targets)),
    }


def read_classes(classes: str | os.PathLike | Sequence[str] | None, rows: list[dict[str, Any]]) -> list[str]:
    if classes is None:
        return sorted({str(r["label"]) for r in rows})
    if isinstance(classes, (str, os.PathLike)):
        return read_labels(labels_file=classes)
    return [str(c) for c in classes]


def zeroshot_eval(
    encoder: Any,
    manifest: str | os.PathLike,
    templates: str | os.PathLike | Sequence[str] = "ensemble",
    classes: str | os.PathLike | Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics as fractions: {"top1", "top5", "mean_per_class_recall", "n", ...}. With `out_dir`, also
    zeroshot.json, zeroshot.md and the PNG pictures there."""
    enc: EncoderLike = as_encoder(encoder)
    rows = read_manifest(manifest, required=("image", "label"))
    names = read_classes(classes, rows)
    index = {c: i for i, c in enumerate(names)}
    for r in rows:
        if str(r["label"]) not in index:
            raise ManifestError(f"{r['_line']}: label {r['label']!r} is not in the class list")
    clf = ZeroShotClassifier(enc, names, templates)
    images = [r["image"] for r in rows]
    targets = np.array([index[str(r["label"])] for r in rows])
    feats = enc.embed_images(images)  # (N, D)
    logits = clf.logits(feats)
    metrics: dict[str, Any] = {
        **classification_metrics(logits, targets),
        "classes": len(names),
        "templates": len(clf.templates),
    }
    if out_dir is not None:
        _write(Path(out_dir), names, clf, targets, softmax(logits), feats, images, metrics)
    return metrics


def _write(
    out: Path,
    names: list[str],
    clf: ZeroShotClassifier,
    targets: np.ndarray,
    probs: np.ndarray,
    feats: np.ndarray,
    images: list[str],
    metrics: dict[str, Any],
) -> None:
    from clipforge.eval import report

    out.mkdir(parents=True, exist_ok=True)
    # The similarity figure: one image of each of the first (up to 8) classes against those classes' prompts.
    firsts: dict[int, int] = {}
    for i, t in enumerate(targets):
        if t not in firsts and len(firsts) < 8:
            firsts[int(t)] = i
    cls_idx, img_idx = list(firsts), list(firsts.values())
    sims = (feats[img_idx] @ clf.weights[:, cls_idx]).T  # (n_classes, n_images)
    prompts = [clf.templates[0].format(clf.names[c]) for c in cls_idx]
    pictures = {
        "Similarity of images and class prompts": report.plot_similarity(
            [images[i] for i in img_idx], prompts, sims, out / "zeroshot_similarity.png"
        ),
        **report.classification_pictures(out, "zeroshot", names, targets, probs, images),
    }
    notes = (
        f"{metrics['n']} images, {len(names)} classes, {metrics['templates']} templates per class. "
        "Similarity cells use the class vector (the mean over templates); the row label shows the first template."
    )
    report.write_report(out, "zeroshot", "Zero-shot classification", metrics, pictures, notes)
