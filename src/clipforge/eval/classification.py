"""Classification metrics shared by the zero-shot and linear-probe evaluations: top-k accuracy and mean
per-class recall, from (N, C) scores and (N,) target class indices."""

from __future__ import annotations

import numpy as np


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
