"""Thresholds from labelled scores: the loosest threshold that still meets a precision target, or the
strictest that still meets a recall target. An item is predicted positive when its score >= threshold."""

from __future__ import annotations

import numpy as np


def _sorted(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return np.asarray(scores, np.float64)[order], np.asarray(positive, bool)[order]


def _cutoffs(s: np.ndarray) -> np.ndarray:
    # Only the last of a run of equal scores is a valid cut: a threshold cannot split tied items.
    return np.flatnonzero(np.append(s[1:] != s[:-1], True))


def threshold_for_precision(scores: np.ndarray, positive: np.ndarray, target: float) -> float | None:
    """The lowest threshold whose precision on these items is >= target (most recall at that precision);
    None when no threshold reaches it."""
    s, y = _sorted(scores, positive)
    if not y.any():
        return None
    tp = np.cumsum(y)
    cuts = _cutoffs(s)
    precision = tp[cuts] / (cuts + 1)
    ok = cuts[precision >= target]
    return float(s[ok[-1]]) if len(ok) else None


def threshold_for_recall(scores: np.ndarray, positive: np.ndarray, target: float) -> float | None:
    """The highest threshold whose recall on these items is >= target; None when there are no positives."""
    s, y = _sorted(scores, positive)
    if not y.any():
        return None
    recall = np.cumsum(y) / y.sum()
    cuts = _cutoffs(s)
    ok = cuts[recall[cuts] >= target - 1e-12]
    return float(s[ok[0]])


def precision_recall(
    scores: np.ndarray, positive: np.ndarray, threshold: float | None
) -> tuple[float, float]:
    """(precision, recall) of `score >= threshold`; precision is 1.0 when nothing is predicted."""
    y = np.asarray(positive, bool)
    pred = np.zeros_like(y) if threshold is None else np.asarray(scores) >= threshold
    tp, n_pred, n_pos = float((pred & y).sum()), float(pred.sum()), float(y.sum())
    return (tp / n_pred if n_pred else 1.0), (tp / n_pos if n_pos else 1.0)
