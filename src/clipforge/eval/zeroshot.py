"""Zero-shot evaluation: the accuracy of `clipforge.zeroshot.ZeroShotClassifier` on a labelled manifest
(top-1, top-5 and mean per-class recall; the metrics are in classification.py).

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

from clipforge.encoder import EncoderSource, as_encoder
from clipforge.eval.classification import classification_metrics
from clipforge.eval.manifest import ManifestError, read_labelled_manifest
from clipforge.zeroshot import ZeroShotClassifier, read_labels, softmax


def read_classes(classes: str | os.PathLike | Sequence[str] | None, rows: list[dict[str, Any]]) -> list[str]:
    if classes is None:
        return sorted({str(r["label"]) for r in rows})
    if isinstance(classes, (str, os.PathLike)):
        return read_labels(labels_file=classes)
    return [str(c) for c in classes]


def zeroshot_eval(
    encoder: EncoderSource,
    manifest: str | os.PathLike,
    templates: str | os.PathLike | Sequence[str] = "ensemble",
    classes: str | os.PathLike | Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics as fractions: {"top1", "top5", "mean_per_class_recall", "n", ...}. With `out_dir`, also
    zeroshot.json, zeroshot.md and the PNG pictures there."""
    enc = as_encoder(encoder)
    rows = read_labelled_manifest(manifest, required=("image", "label"))
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
