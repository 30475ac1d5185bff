"""Turning a request (texts, images, a vector, negatives) into one query vector.

A combined query is a weighted sum of unit vectors, not renormalised, so a hit's score reads directly as
    w_text * cos(x, text) + w_image * cos(x, image) + cos(x, vector) - negative_weight * cos(x, negative)
and a single-text query scores plain cosine similarity. `combine` is that sum on vectors already computed (the
service's batched encoder calls); `query_vector` embeds with an encoder first. Ranking: rank.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import as_matrix, unit
from .types import EncoderLike


def _texts(value: str | Sequence[str], what: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ValueError(f"{what} is an empty list")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{what} must be non-empty strings, got {t!r}")
    return texts


def _images(value: Any) -> list[Any]:
    if isinstance(value, (str, Path, bytes)) or not isinstance(value, (list, tuple)):
        return [value]
    if not value:
        raise ValueError("image is an empty list")
    return list(value)


def _mean_unit(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = as_matrix(x, dim, f"encoder output for {what}")
    return unit(x.mean(axis=0))  # several texts/images: the centroid direction (prompt ensembling)


def combine(
    dim: int,
    *,
    texts: np.ndarray | None = None,
    images: np.ndarray | None = None,
    vectors: np.ndarray | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    negatives: np.ndarray | None = None,
    negative_weight: float = 0.5,
) -> np.ndarray:
    """One query vector (D,) float32 from embedded texts (T, D), images (I, D), raw vectors (V, D) and
    negatives (N, D); each group counts as its centroid direction (see the module docstring)."""
    if texts is None and images is None and vectors is None:
        raise ValueError("a query needs at least one of text=, image= or vector=")
    if len(weights) != 2:
        raise ValueError(f"weights must be (text_weight, image_weight), got {weights!r}")
    q = np.zeros(dim, np.float32)
    if texts is not None:
        q += float(weights[0]) * _mean_unit(texts, dim, "text")
    if images is not None:
        q += float(weights[1]) * _mean_unit(images, dim, "image")
    if vectors is not None:
        q += unit(as_matrix(vectors, dim, "query vector")).mean(axis=0)
    if negatives is not None:
        q -= float(negative_weight) * _mean_unit(negatives, dim, "negative")
    return q.astype(np.float32)


def query_vector(
    dim: int,
    encoder: EncoderLike | None,
    text: str | Sequence[str] | None = None,
    image: Any = None,
    vector: np.ndarray | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    negative: str | Sequence[str] | None = None,
    negative_weight: float = 0.5,
) -> np.ndarray:
    """One query vector (D,) float32 from any mix of text, image and raw vector, minus the negatives."""
    if text is None and image is None and vector is None:
        raise ValueError("a query needs at least one of text=, image= or vector=")
    needs_encoder = text is not None or image is not None or negative is not None
    if needs_encoder and encoder is None:
        raise ValueError("text, image and negative queries need encoder=")
    return combine(
        dim,
        texts=None if text is None else encoder.embed_texts(_texts(text, "text")),
        images=None if image is None else encoder.embed_images(_images(image)),
        vectors=vector,
        weights=weights,
        negatives=None if negative is None else encoder.embed_texts(_texts(negative, "negative")),
        negative_weight=negative_weight,
    )
