"""The one encoder protocol, in a module that imports nothing of the package, so that every layer (the index
core included, which may import nothing above it) names the same type. `clipforge.encoder.Encoder` implements it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class EncoderLike(Protocol):
    """Texts and images to (N, D) float32 L2-normalised vectors.

    identity: {"model", "fingerprint", "dim"} naming the vectors' space; two encoders with the same
        fingerprint give the same vectors. `{}` for an encoder that cannot say (no caching, no collection).
    dim: D.
    logit_scale: the temperature the model was trained with (cosine similarities times it are logits).
    """

    identity: dict[str, Any]
    dim: int
    logit_scale: float

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...
