"""A loaded model behind a numpy interface: images or texts in, L2-normalised float32 vectors out.

This is what the search engine, the applications and the service hold; it knows nothing of files beyond
`load_image`, and nothing of indexes or HTTP.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.model.clip import CLIP
from clipforge.tokenizer import AnyTokenizer
from clipforge.transforms import Preprocess


def fingerprint(model: CLIP) -> str:
    """sha256 over the config and every tensor's bytes: two encoders give the same vectors iff it matches."""
    if hasattr(
        model, "fingerprint"
    ):  # runtimes without PyTorch tensors (an ONNX export) hash their own files
        return model.fingerprint()
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


class Encoder:
    def __init__(
        self,
        model: CLIP,
        preprocess: Preprocess,
        tokenizer: AnyTokenizer | None,
        *,
        name: str = "",
        batch_size: int = 32,
    ):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name or model.config.name or "model"
        self.batch_size = batch_size
        self.device = getattr(model, "device", None) or next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, *, batch_size: int = 32, **load_options: Any) -> Encoder:
        """`load_options` are clipforge.load's: vocab, device, precision, compile, channels_last, ..."""
        from clipforge.checkpoint import load

        model, preprocess, tokenizer = load(path, **load_options)
        return cls(model, preprocess, tokenizer, name=str(path), batch_size=batch_size)

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @cached_property
    def identity(self) -> dict[str, Any]:
        return {"model": self.name, "fingerprint": fingerprint(self.model), "dim": self.dim}

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) preprocessed images -> (N, D) normalised vectors."""
        out = [
            self.model.encode_image(pixels[i : i + self.batch_size].to(self.device), normalize=True)
            for i in range(0, len(pixels), self.batch_size)
        ]
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, bytes or PIL images -> (N, D). A bad image raises ImageError naming it."""
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        return self.embed_pixels(self.preprocess.batch(list(images)))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer: load it with vocab=PATH to embed text")
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, not one string")
        out = []
        for i in range(0, len(texts), max(self.batch_size, 256)):
            tokens = self.tokenizer(list(texts[i : i + max(self.batch_size, 256)])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True))
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.dim), np.float32)
