"""Running a model at another input size or context length than it was trained at, by stretching its position
embeddings: bicubic on the patch grid for images (as transformers' `interpolate_pos_encoding`), linear along the
sequence past the first positions for texts (Long-CLIP, Zhang et al. 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforge.model.config import BertTextConfig, CLIPConfig, EfficientNetConfig

# Image towers' grid position embeddings, (1 + g*g, W) with the pooling token (class token or mean) first.
_GRID_EMBEDDINGS = {"vit": "visual.positional_embedding", "resnet": "visual.attnpool.positional_embedding"}
TEXT_POSITIONS = "text.positional_embedding"
# Long-CLIP keeps the first 20 positions as trained (short captions use them well) and stretches the rest.
LONG_CLIP_KEEP = 20


class ResizeError(ValueError):
    """A model cannot run at the size or context length asked for."""


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
    except ValueError as e:  # the tower config's own checks
        raise ResizeError(f"image_size={image_size}: {e}") from None
    key = None if isinstance(v, EfficientNetConfig) else _GRID_EMBEDDINGS[v.kind]
    if key in sd:
        grid = image_size // new.vision.patch_size
        sd = {**sd, key: interpolate_grid(sd[key], grid)}
    return new, sd


def stretch_positions(pos: torch.Tensor, length: int, keep: int = LONG_CLIP_KEEP) -> torch.Tensor:
    """(T, W) text position embeddings -> (length, W): the first `keep` exactly, the other T - keep stretched
    linearly over length - keep positions (extrapolated past the last, as Long-CLIP does for its last three)."""
    T = pos.shape[0]
    if length <= T:
        return pos[:length]
    if T < keep + 2:
        raise ResizeError(f"a context of {T} positions is too short to stretch past its first {keep}")
    tail = pos[keep:].float()  # (n, W)
    n = tail.shape[0]
    slots = length - keep
    # The source position (in tail rows) each stretched slot reads from.
    x = torch.arange(slots, dtype=torch.float64, device=pos.device) * n / slots
    lo = x.floor().long().clamp(max=n - 2)
    w = (x - lo).to(torch.float32).unsqueeze(1)  # > 1 past the last source position: extrapolation
    stretched = tail[lo] * (1 - w) + tail[lo + 1] * w
    return torch.cat([pos[:keep].float(), stretched]).to(pos.dtype)


def long_context_length(context_length: int, keep: int = LONG_CLIP_KEEP) -> int:
    """Long-CLIP's longer context for a trained one: 4x the stretched part (77 -> 248)."""
    return keep + 4 * (context_length - keep)


def with_context_length(
    cfg: CLIPConfig, sd: dict[str, torch.Tensor], context_length: int
) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """`cfg` and its weights for texts of up to `context_length` tokens (the position embeddings stretched or
    cut); a model to fine-tune at the new length, as Long-CLIP does. A BERT tower learned all the rows of its
    position table, so only its context changes, within that table."""
    if context_length == cfg.text.context_length:
        return cfg, sd
    if isinstance(cfg.text, BertTextConfig):
        if context_length > cfg.text.max_positions:
            raise ResizeError(
                f"context_length={context_length}: this BERT text tower learned {cfg.text.max_positions} "
                "positions, and they are not stretched"
            )
    elif TEXT_POSITIONS not in sd:
        raise ResizeError(
            f"context_length={context_length}: only the CLIP text transformer's positions can be stretched"
        )
    else:
        sd = {**sd, TEXT_POSITIONS: stretch_positions(sd[TEXT_POSITIONS], context_length)}
    return cfg.replace(text={"context_length": context_length}), sd
