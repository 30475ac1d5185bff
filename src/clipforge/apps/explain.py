"""Which regions of an image match a text: a heat map over the model's input crop.

Three methods:
- "occlusion" (any tower; the default): paint a sliding window with the image's median colour and record how
  much the similarity to the text drops; each pixel gets the mean drop of the windows covering it. Costs one
  batched forward pass of (S / stride)^2 images, but it asks the model itself and localised best in our test
  (docs/applications.md gives the measurements).
- "tokens" (ViT towers): every patch token after the final LayerNorm is projected with
  `visual.proj` into the shared space, exactly as the class token is, and compared with the text by cosine
  similarity. One forward pass, no gradient; a (grid, grid) map upsampled to the image. The patch tokens are
  never trained to align with text, so on large web-trained models the map is often noisy; it is exact about
  what the tokens carry, not about what the class token attended to.
- "gradient" (any tower, the only one for ResNets): the gradient of cos(image, text) with respect to the
  input pixels, times the input's deviation from the mean colour (gradient x input), summed over channels,
  clipped at 0 (regions that raise the score) and smoothed over a patch-sized window.
Both are drawn over the preprocessed image (what the model saw) by `save_overlay`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.encoder import Encoder, EncoderLike, EncoderSource, as_encoder
from clipforge.model.clip import CLIP
from clipforge.model.vit import VisionTransformer

METHODS = ("occlusion", "tokens", "gradient")


def _text_feature(enc: EncoderLike, text: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(enc.embed_texts([text])[0], np.float32))  # (D,)


def token_heatmap(model: CLIP, pixels: torch.Tensor, text_feature: torch.Tensor) -> torch.Tensor:
    """(1, 3, S, S) preprocessed image -> (g, g) cosine similarity of each projected patch token with the text."""
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError("the 'tokens' method needs a ViT image tower; use method='gradient' for a ResNet")
    with torch.inference_mode():
        tokens = visual.forward_tokens(pixels.to(model.dtype))[0, 1:] @ visual.proj  # (g*g, D)
        sims = F.normalize(tokens.float(), dim=-1) @ F.normalize(text_feature.float(), dim=0)  # (g*g,)
    g = int(round(sims.numel() ** 0.5))
    return sims.view(g, g)


def gradient_heatmap(
    model: CLIP, pixels: torch.Tensor, text_feature: torch.Tensor, window: int
) -> torch.Tensor:
    """(1, 3, S, S) preprocessed image -> (S, S) positive gradient x input saliency, smoothed."""
    x = pixels.detach().clone().to(model.dtype).requires_grad_(True)
    with torch.enable_grad():
        cos = model.encode_image(x, normalize=True)[0] @ F.normalize(text_feature.to(x.dtype), dim=0)
        (grad,) = torch.autograd.grad(cos, x)
    # Deviation from the per-channel mean: a flat background contributes nothing whatever its gradient.
    dev = x.detach() - x.detach().mean(dim=(2, 3), keepdim=True)
    sal = (grad * dev).sum(dim=1, keepdim=True).clamp(min=0)  # (1, 1, S, S)
    k = max(window | 1, 1)  # odd window keeps the map centred
    return F.avg_pool2d(sal, k, stride=1, padding=k // 2, count_include_pad=False)[0, 0].float()


def occlusion_heatmap(
    model: CLIP, pixels: torch.Tensor, text_feature: torch.Tensor, window: int, stride: int, batch: int = 64
) -> torch.Tensor:
    """(1, 3, S, S) preprocessed image -> (S, S) mean drop in cosine similarity when a window is occluded."""
    S = pixels.shape[-1]
    txt = F.normalize(text_feature.to(model.dtype), dim=0)
    fill = pixels[0].flatten(1).median(dim=1).values.view(3, 1, 1)  # background colour for most images
    starts = list(range(0, S - window + 1, stride))
    if starts[-1] != S - window:
        starts.append(S - window)
    boxes = [(y, x) for y in starts for x in starts]
    drops = []
    with torch.inference_mode():
        base = model.encode_image(pixels.to(model.dtype), normalize=True)[0] @ txt
        for i in range(0, len(boxes), batch):
            xs = pixels.repeat(len(boxes[i : i + batch]), 1, 1, 1)
            for j, (y, x) in enumerate(boxes[i : i + batch]):
                xs[j, :, y : y + window, x : x + window] = fill
            drops.append(base - model.encode_image(xs.to(model.dtype), normalize=True) @ txt)
    drop = torch.cat(drops).float()
    heat, count = torch.zeros(S, S), torch.zeros(S, S)
    for (y, x), d in zip(boxes, drop.cpu()):
        heat[y : y + window, x : x + window] += d
        count[y : y + window, x : x + window] += 1
    return heat / count


def explain(
    model: EncoderSource, image: Any, text: str, method: str = "occlusion"
) -> tuple[np.ndarray, Image.Image]:
    """(heat (S, S) in [0, 1] over the model's input crop, that crop as an RGB image). Needs a PyTorch
    `Encoder` (or a triple or path that makes one): the maps read the model's layers, not only its vectors."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    enc = as_encoder(model)
    if not isinstance(enc, Encoder) or not isinstance(enc.model, CLIP):
        raise TypeError(f"explain needs a PyTorch clipforge Encoder, got {type(enc).__name__}")
    clip = enc.model
    pixels = enc.preprocess.batch([image]).to(next(clip.parameters()).device)  # (1, 3, S, S)
    txt = _text_feature(enc, text).to(pixels.device)
    s = pixels.shape[-1]
    if method == "occlusion":
        window = max(s // 4, 2)
        heat = occlusion_heatmap(clip, pixels, txt, window, max(window // 4, 1))
    elif method == "tokens":
        heat = token_heatmap(clip, pixels, txt)
    else:
        heat = gradient_heatmap(clip, pixels, txt, window=clip.config.vision.patch_size // 2)
    heat = F.interpolate(heat[None, None].float(), size=(s, s), mode="bilinear", align_corners=False)[0, 0]
    heat = heat - heat.min()
    heat = (heat / heat.max().clamp(min=1e-12)).cpu().numpy()
    return heat, _unnormalise(pixels[0].cpu(), clip.config.preprocess)


def _unnormalise(x: torch.Tensor, cfg: Any) -> Image.Image:
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    rgb = ((x.float() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(rgb, "RGB")


# A perceptually ordered ramp from dark blue through red to yellow (anchor colours chosen by hand).
_RAMP = np.array([[0, 0, 80], [60, 0, 150], [200, 30, 90], [250, 120, 20], [255, 240, 60]], np.float64)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8."""
    pos = np.clip(heat, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    t = (pos - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[lo + 1]).round().astype(np.uint8)


def save_overlay(
    crop: Image.Image, heat: np.ndarray, path: str | os.PathLike, alpha: float = 0.55, min_size: int = 256
) -> Path:
    """The image, its heat map blended over it, and the heat map alone, side by side in one PNG."""
    side = max(crop.width, min_size)
    base = crop.resize((side, side), Image.Resampling.BICUBIC)
    colours = Image.fromarray(colorize(heat)).resize((side, side), Image.Resampling.BILINEAR)
    blend = Image.blend(base, colours, alpha)
    out = Image.new("RGB", (3 * side + 16, side), "white")
    for i, im in enumerate((base, blend, colours)):
        out.paste(im, (i * (side + 8), 0))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    out.save(p)
    return p
