"""Rank candidates against one query: images against a prompt (best of N generations) or captions against
an image (best caption). Probabilities are the softmax of the model's scaled similarities over the
candidates, so they say how the candidates compare with each other, not whether any of them is good."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipforge.zeroshot import as_encoder, logit_scale_of, softmax


def _ranked(candidates: Sequence[Any], sims: np.ndarray, scale: float, key: str) -> list[dict[str, Any]]:
    probs = softmax(scale * sims)
    order = np.argsort(-sims, kind="stable")
    return [
        {"rank": r + 1, key: str(candidates[i]), "similarity": float(sims[i]), "probability": float(probs[i])}
        for r, i in enumerate(order)
    ]


def rank_images(model: Any, text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """Images sorted by similarity to `text`: [{"rank", "image", "similarity", "probability"}, ...]."""
    if not images:
        raise ValueError("rank needs at least one image")
    enc = as_encoder(model)
    sims = enc.embed_images(list(images)) @ enc.embed_texts([text])[0]
    return _ranked(images, sims, logit_scale_of(enc), "image")


def rank_texts(model: Any, image: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Texts sorted by similarity to `image`: [{"rank", "text", "similarity", "probability"}, ...]."""
    if not texts:
        raise ValueError("rank needs at least one text")
    enc = as_encoder(model)
    sims = enc.embed_texts(list(texts)) @ enc.embed_images([image])[0]
    return _ranked(texts, sims, logit_scale_of(enc), "text")
