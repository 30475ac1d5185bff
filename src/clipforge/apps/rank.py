"""Rank candidates against one query: images against a prompt (best of N generations) or captions against
an image (best caption). Probabilities are the softmax of the model's scaled similarities over the
candidates, so they say how the candidates compare with each other, not whether any of them is good."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipforge.encoder import EncoderSource, as_encoder
from clipforge.zeroshot import softmax


def ranked(candidates: Sequence[Any], sims: np.ndarray, logit_scale: float, key: str) -> list[dict[str, Any]]:
    """The vectors-first core: candidates with their (N,) similarities to the query, best first, as
    [{"rank", key, "similarity", "probability"}, ...]."""
    probs = softmax(logit_scale * sims)
    order = np.argsort(-sims, kind="stable")
    return [
        {"rank": r + 1, key: str(candidates[i]), "similarity": float(sims[i]), "probability": float(probs[i])}
        for r, i in enumerate(order)
    ]


def rank_images(model: EncoderSource, text: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """Images sorted by similarity to `text`: [{"rank", "image", "similarity", "probability"}, ...]."""
    if not images:
        raise ValueError("rank needs at least one image")
    enc = as_encoder(model)
    sims = enc.embed_images(list(images)) @ enc.embed_texts([text])[0]
    return ranked(images, sims, enc.logit_scale, "image")


def rank_texts(model: EncoderSource, image: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Texts sorted by similarity to `image`: [{"rank", "text", "similarity", "probability"}, ...]."""
    if not texts:
        raise ValueError("rank needs at least one text")
    enc = as_encoder(model)
    sims = enc.embed_texts(list(texts)) @ enc.embed_images([image])[0]
    return ranked(texts, sims, enc.logit_scale, "text")
