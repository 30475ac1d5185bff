"""`Encoder`, the loaded model behind the one encoder protocol (`EncoderLike`, defined in clipforge.protocols).

`EncoderLike` is what every consumer of embeddings holds (zero-shot, the applications, the evaluators, the
service): texts or images in, L2-normalised float32 vectors out, plus what a caller needs to interpret them
(`identity`, `dim`, `logit_scale`). `Encoder` implements it for a CLIP model (or an ONNX export) with its
preprocessing and tokenizer; tests implement it with fakes that have known answers. `as_encoder` is the one
adapter from what a user holds (an encoder, a `clipforge.load` triple, a checkpoint path) to the protocol.

This module knows nothing of indexes or HTTP, and nothing of files beyond `load_image` and `Encoder.load`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clipforge.long_text import LongText, check_long, encode_texts
from clipforge.model.clip import CLIP
from clipforge.protocols import EncoderLike
from clipforge.tokenizer import AnyTokenizer
from clipforge.transforms import Preprocess

if TYPE_CHECKING:
    from clipforge.onnx_export import OnnxCLIP


def fingerprint(model: CLIP | OnnxCLIP) -> str:
    """sha256 over the config and every tensor's bytes: two encoders give the same vectors iff it matches."""
    if not isinstance(model, CLIP):
        return model.fingerprint()  # a runtime without PyTorch tensors (an ONNX export) hashes its own files
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _device(model: CLIP | OnnxCLIP) -> torch.device:
    return next(model.parameters()).device if isinstance(model, CLIP) else model.device


class Encoder:
    """`EncoderLike` for a CLIP model (or an ONNX export), its preprocessing and its tokenizer."""

    def __init__(
        self,
        model: CLIP | OnnxCLIP,
        preprocess: Preprocess,
        tokenizer: AnyTokenizer | None,
        *,
        name: str = "",
        batch_size: int = 32,
        long: LongText = "truncate",
        folder: Path | None = None,
    ):
        check_long(long)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name or model.config.name or "model"
        self.batch_size = batch_size
        self.long = long  # how embed_texts reads texts past the context (clipforge.long_text)
        self.device = _device(model)
        self.folder = folder  # the model folder it was loaded from, if any (where relevance.json lives)

    @classmethod
    def load(
        cls, path: str | Path, *, batch_size: int = 32, long: LongText = "truncate", **load_options: Any
    ) -> Encoder:
        """`load_options` are clipforge.load's: vocab, device, precision, compile, channels_last, towers, ..."""
        from clipforge.checkpoint import load
        from clipforge.checkpoint.read import resolve

        model, preprocess, tokenizer = load(path, **load_options)
        where = resolve(path)
        folder = where if where.is_dir() else None
        return cls(
            model, preprocess, tokenizer, name=str(path), batch_size=batch_size, long=long, folder=folder
        )

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale().detach())

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
    def embed_texts(self, texts: Sequence[str], long: LongText | None = None) -> np.ndarray:
        """Texts -> (N, D). `long` ("truncate", "chunk", "interpolate"; default: the encoder's `long`) says how
        a text past the context length is read: see clipforge.long_text."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name} has no tokenizer: load it with vocab=PATH to embed text")
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, not one string")
        batch = max(self.batch_size, 256)
        vecs = encode_texts(self.model, self.tokenizer, texts, long or self.long, batch, self.device)
        return vecs.float().cpu().numpy() if len(texts) else np.zeros((0, self.dim), np.float32)


EncoderSource = EncoderLike | tuple | list | str | os.PathLike
"""What the library entry points accept as a model: see `as_encoder`."""


def as_encoder(source: EncoderSource) -> EncoderLike:
    """The encoder behind `source`: an `EncoderLike` as it is, a `(model, preprocess, tokenizer)` triple as
    `clipforge.load` returns it, or a checkpoint path (or "default") loaded with `Encoder.load`."""
    if isinstance(source, Encoder):  # before the protocol check, which would hash the weights for `identity`
        return source
    if isinstance(source, (tuple, list)) and len(source) == 3:
        return Encoder(*source)
    if isinstance(source, (str, os.PathLike)):
        return Encoder.load(source)
    if isinstance(source, EncoderLike):
        return source
    missing = [
        m for m in ("identity", "dim", "logit_scale", "embed_texts", "embed_images") if not hasattr(source, m)
    ]
    raise TypeError(
        f"expected an encoder (clipforge.encoder.EncoderLike), a (model, preprocess, tokenizer) triple or a "
        f"checkpoint path, got {type(source).__name__}, which lacks {', '.join(missing)}"
    )


def need_encoder(encoder: EncoderLike | None, holder: str) -> EncoderLike:
    """`encoder`, or a TypeError saying that the `holder` (a classifier, tagger, ...) has none to embed with."""
    if encoder is None:
        raise TypeError(
            f"this {holder} was built from text vectors and holds no encoder: pass image vectors to its "
            "*_vectors methods"
        )
    return encoder
