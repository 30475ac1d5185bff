"""Checking and normalising the vectors a collection is given."""

from __future__ import annotations

from typing import Any

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def as_matrix(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate a (N, D) or (D,) array of finite numbers -> (N, D) float32."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}) or ({dim},), got {np.shape(vectors)}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{what} contain NaN or infinity (rows {bad[:10].tolist()})")
    return x
