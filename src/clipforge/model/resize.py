"""Running a model at another input size than it was trained at, by stretching its position embeddings: bicubic
on the patch grid (as transformers' `interpolate_pos_encoding`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforge.model.config import CLIPConfig, EfficientNetConfig

# Image towers' grid position embeddings, (1 + g*g, W) with the pooling token (class token or mean) first.
_GRID_EMBEDDINGS = {"vit": "visual.positional_embedding", "resnet": "visual.attnpool.positional_embedding"}


class ResizeError(ValueError):
    """A model cannot run at the size asked for."""


def interpolate_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + g*g, W) position embeddings -> (1 + grid*grid, W): the g x g grid resized bicubically
    (align_corners=False, no antialiasing, in fp32: transformers' interpolate_pos_encoding), token 0 kept."""
    g = math.isqrt(pos.shape[0] - 1)
    if g * g != pos.shape[0] - 1:
        raise ResizeError(f"{pos.shape[0] - 1} position embeddings do not form a square grid")
    if g == grid:
        return pos
    patches = pos[1:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)  # (grid*grid, W)
    return torch.cat([pos[:1].float(), patches]).to(pos.dtype)


def with_image_size(
    cfg: CLIPConfig, sd: dict[str, torch.Tensor], image_size: int
) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """`cfg` and its weights `sd` (clipforge names) for inputs of `image_size` pixels; preprocessing follows.
    At the trained size nothing changes. An image tower without position embeddings (EfficientNet) needs none;
    a state dict without the image tower (towers="text") changes its config only."""
    v = cfg.vision
    if image_size == v.image_size:
        return cfg, sd
    step = 1 if isinstance(v, EfficientNetConfig) else v.patch_size  # a ResNet's is its total stride, 32
    if image_size <= 0 or image_size % step:
        raise ResizeError(f"image_size={image_size}: the image tower needs a positive multiple of {step}")
    try:
        new = cfg.replace(vision={"image_size": image_size})
    except ValueError as e:  # not a multiple of the patch size or stride
        raise ResizeError(f"image_size={image_size}: {e}") from None
    key = None if isinstance(v, EfficientNetConfig) else _GRID_EMBEDDINGS[v.kind]
    if key in sd:
        grid = image_size // new.vision.patch_size
        sd = {**sd, key: interpolate_grid(sd[key], grid)}
    return new, sd
