"""CLIP score: how well an image matches a caption, in the two definitions in common use.

- `torchmetrics`: 100 * max(cos(image, caption), 0), as torchmetrics' CLIPScore computes it (it reports the
  mean over the batch; we return every pair and the mean).
- `clipscore`: CLIP-S = 2.5 * max(cos, 0), from Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
  Metric for Image Captioning". Its reference variant RefCLIP-S is the harmonic mean of CLIP-S and
  max(max over reference captions r of cos(caption, r), 0).

Scores of different models (or of the same model with other preprocessing) are not comparable.
`pixel_similarity` / `guidance_loss` work on raw pixels in [0, 1] with gradients, for guiding a generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipforge.encoder import Encoder, EncoderSource, as_encoder
from clipforge.model.clip import CLIP

SCALES = {"torchmetrics": 100.0, "clipscore": 2.5}


def pair_similarity(model: EncoderSource, images: Sequence[Any], captions: Sequence[str]) -> np.ndarray:
    """(N,) cosine similarity of image i with caption i."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: scores are computed pairwise")
    enc = as_encoder(model)
    return np.einsum("nd,nd->n", enc.embed_images(list(images)), enc.embed_texts(list(captions)))


def clip_score(
    model: EncoderSource, images: Sequence[Any], captions: Sequence[str], kind: str = "torchmetrics"
) -> np.ndarray:
    """(N,) scores of image i against caption i; `kind` is "torchmetrics" (100 * max(cos, 0)) or
    "clipscore" (2.5 * max(cos, 0))."""
    if kind not in SCALES:
        raise ValueError(f"unknown CLIP score kind {kind!r}; valid: {sorted(SCALES)}")
    return SCALES[kind] * np.maximum(pair_similarity(model, images, captions), 0.0)


def ref_clip_score(
    model: EncoderSource, images: Sequence[Any], captions: Sequence[str], references: Sequence[Sequence[str]]
) -> np.ndarray:
    """(N,) RefCLIP-S: harmonic mean of CLIP-S (2.5 * max(cos, 0)) and the caption's best cosine
    similarity to its item's reference captions (clipped at 0)."""
    if len(references) != len(captions):
        raise ValueError(f"{len(references)} reference lists for {len(captions)} captions")
    if not all(references):
        raise ValueError(
            f"item {next(i for i, r in enumerate(references) if not r)} has no reference captions"
        )
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: scores are computed pairwise")
    enc = as_encoder(model)
    img = enc.embed_images(list(images))  # (N, D)
    cand = enc.embed_texts(list(captions))  # (N, D)
    clip_s = SCALES["clipscore"] * np.maximum((img * cand).sum(axis=1), 0.0)
    # Every reference caption in one batch; offsets say which item each belongs to.
    refs = enc.embed_texts([r for rs in references for r in rs])
    bounds = np.cumsum([0] + [len(rs) for rs in references])
    ref_s = np.array(
        [max(float((refs[a:b] @ cand[i]).max()), 0.0) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    )
    total = clip_s + ref_s
    out = np.where(total > 0, 2 * clip_s * ref_s / np.where(total > 0, total, 1.0), 0.0)
    return out


def normalize_pixels(
    pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int
) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the model's input: resized to (size, size) (bicubic, antialiased; the
    whole frame, no crop) and normalised with the model's mean and std. Differentiable."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
    x = pixels
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def pixel_similarity(
    model: CLIP | Encoder, pixels: torch.Tensor, text_features: torch.Tensor
) -> torch.Tensor:
    """(B,) cosine similarity of raw-pixel images (B, 3, H, W) in [0, 1] with text features (B, D) or (D,),
    differentiable with respect to `pixels`. `model` is a CLIP or an Encoder."""
    clip = model.model if isinstance(model, Encoder) else model
    p = clip.config.preprocess
    x = normalize_pixels(pixels, p.mean, p.std, p.image_size)
    img = clip.encode_image(x, normalize=True)  # (B, D)
    txt = F.normalize(text_features.to(img.dtype), dim=-1)
    return (img * txt).sum(-1) if txt.dim() == 2 else img @ txt


def guidance_loss(model: CLIP | Encoder, pixels: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Scalar loss to minimise to raise the CLIP score of `pixels` for the text: mean of 1 - cos."""
    return (1.0 - pixel_similarity(model, pixels, text_features)).mean()
