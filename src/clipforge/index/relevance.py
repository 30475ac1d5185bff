"""How likely a vector hit is relevant: its chance excess, and a calibration mapping that to a probability.

The feature. A flat score cut-off fails because the band of relevant scores moves with the query, so each hit's
cosine is read against the query's own score distribution over the collection: its scores against a uniform
sample of stored vectors (the background) give a robust centre (median) and spread (1.4826 x MAD), and
z = (score - centre) / spread. Among N unrelated items the best z is about sqrt(2 ln N) by chance alone (the
expected maximum of N normal draws), so what matters is the excess z - sqrt(2 ln N) (`chance_excess`).

The mapping. relevance = sigmoid((excess - margin) / scale). How far a relevant hit stands out depends on the
model (how spread its embedding space is), so the two numbers are per model: `fit` estimates them by logistic
regression on labelled searches (held-out queries whose relevant items are known), `clipforge index calibrate`
runs it against a collection and stores the result in the collection (and in the model's folder as
relevance.json, calibrate.py, which `index create` copies into new collections). A collection with none uses FIXED
(margin 1, scale 0.5: chosen by hand, not fitted, and measured in BENCHMARKS.md to be well calibrated for one
model and worse than a constant for another; that is why calibrations are fitted per model).

Fitting on the concepts a model was trained on would be overconfident on concepts it was not (bench/
search_quality.py measured it), so the default model's calibration is fitted on one half of the corpus's
held-out concepts and measured on the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .types import CollectionError

MIN_BACKGROUND = 32  # fewer items than this say nothing about a distribution: no estimate, no cut-off
MIN_PAIRS = 50  # a fit on fewer labelled hits than this says little
RIDGE = 1e-3  # keeps the fit finite when the labels separate perfectly


@dataclass(frozen=True)
class Calibration:
    """relevance = sigmoid((excess - margin) / scale); `fitted`: what it was fitted on (None: chosen by hand)."""

    margin: float = 1.0
    scale: float = 0.5
    fitted: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and math.isfinite(self.scale) and self.scale > 0):
            raise CollectionError(
                f"a relevance calibration needs a finite margin and a positive finite scale, got "
                f"margin={self.margin!r} scale={self.scale!r}"
            )

    def __call__(self, excess: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-(np.asarray(excess, np.float64) - self.margin) / self.scale))).astype(
            np.float32
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, where: str) -> Calibration:
        """From its JSON form; a named CollectionError for anything else (`where` names the file)."""
        if not isinstance(d, dict) or not {"margin", "scale"} <= set(d):
            raise CollectionError(f"{where}: a relevance calibration needs 'margin' and 'scale', got {d!r}")
        try:
            return cls(float(d["margin"]), float(d["scale"]), d.get("fitted"))
        except (TypeError, ValueError) as e:
            raise CollectionError(f"{where}: bad relevance calibration {d!r}: {e}") from None


FIXED = Calibration()


def chance_excess(scores: np.ndarray, background: np.ndarray, n_items: int) -> np.ndarray | None:
    """How far (n,) cosines `scores` stand out beyond chance: z - sqrt(2 ln N), z read against the query's
    background scores (B,); None (no estimate) when the background has fewer than MIN_BACKGROUND items."""
    if len(background) < MIN_BACKGROUND:
        return None
    centre = float(np.median(background))
    spread = max(1.4826 * float(np.median(np.abs(background - centre))), 1e-6)
    z = (np.asarray(scores, np.float64) - centre) / spread
    return z - math.sqrt(2.0 * math.log(max(n_items, 2)))


def fit(excess: np.ndarray, relevant: np.ndarray, fitted: dict | None = None) -> Calibration:
    """The logistic calibration of hits' `excess` (n,) against whether each was `relevant` (n,) (Newton's
    method on the log-likelihood, with a small ridge). `fitted` is recorded as its provenance."""
    x = np.asarray(excess, np.float64)
    y = np.asarray(relevant, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"excess and relevant must be two (n,) arrays, got {x.shape} and {y.shape}")
    if len(x) < MIN_PAIRS or not (0 < y.sum() < len(y)):
        raise ValueError(
            f"a relevance fit needs at least {MIN_PAIRS} labelled hits with both relevant and irrelevant ones; "
            f"got {len(x)} hits, {int(y.sum())} relevant"
        )
    X = np.stack([x, np.ones_like(x)], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + RIDGE * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    slope, bias = float(w[0]), float(w[1])
    if slope <= 0:
        raise ValueError(f"hits that stand out more were not more often relevant (slope {slope:.3g}): no fit")
    return Calibration(margin=-bias / slope, scale=1.0 / slope, fitted=fitted)


def log_loss(relevance: np.ndarray, relevant: np.ndarray) -> float:
    """Mean negative log-likelihood of labels `relevant` under probabilities `relevance` (clipped to 1e-4)."""
    p = np.clip(np.asarray(relevance, np.float64), 1e-4, 1 - 1e-4)
    y = np.asarray(relevant, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
