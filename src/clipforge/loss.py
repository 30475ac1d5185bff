"""Contrastive losses: CLIP's symmetric InfoNCE and the sigmoid (SigLIP) loss, with the cross-rank gather.

Across processes each rank holds B of the global N = world * B pairs. Two exact ways to compute the global loss:
- gathered (default): every rank gathers all N features *with gradient* and computes the full (N, N) loss; DDP then
  averages gradients, and since every rank computes the same loss, the average equals one process's gradient.
- local: every rank computes only its own B rows against all N columns (labels offset by rank * B); the mean over
  ranks of these row losses is the global loss, with less memory ((B, N) instead of (N, N) logits).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (world * B, D) in rank order, differentiable with respect to every rank's rows."""
    _, size = world()
    if size == 1:
        return x

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.13 deprecates it without a drop-in replacement for autograd
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        parts = all_gather(x)
    return torch.cat(parts, dim=0)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local: bool = False,
) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix. Features are (B, D), L2-normalised, per rank."""
    rank, _ = world()
    all_img, all_txt = gather_with_grad(image_features), gather_with_grad(text_features)
    if local:
        B = image_features.shape[0]
        labels = torch.arange(B, device=image_features.device) + rank * B
        per_image = logit_scale * image_features @ all_txt.t()  # (B, N): my images vs all texts
        per_text = logit_scale * text_features @ all_img.t()  # (B, N): my texts vs all images
    else:
        N = all_img.shape[0]
        labels = torch.arange(N, device=image_features.device)
        per_image = logit_scale * all_img @ all_txt.t()  # (N, N)
        per_text = per_image.t()
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


LOSSES = ("clip", "sigmoid")


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP (Zhai et al., 2023): every pair is an independent binary decision, +1 on the diagonal, -1 off it.
    Normalised by the number of images, as the paper does. Gathers texts across ranks with gradient.
    After DDP averages the ranks' gradients the result equals the single-process gradient on the global batch
    (each rank's value is its share of the global sum; average it across ranks to report the global loss)."""
    rank, _ = world()
    all_txt = gather_with_grad(text_features)
    B = image_features.shape[0]
    logits = logit_scale * image_features @ all_txt.t() + logit_bias  # (B, N)
    targets = -torch.ones_like(logits)
    rows = torch.arange(B, device=logits.device)
    targets[rows, rows + rank * B] = 1.0
    return -F.logsigmoid(targets * logits).sum() / B


def contrastive_loss(
    kind: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    local: bool = False,
) -> torch.Tensor:
    """The training loss by name: "clip" (InfoNCE; `local` picks the row-local variant) or "sigmoid".
    Features are cast to fp32 first: the (N, N) logits and their softmax are where bf16 loses accuracy."""
    img, txt = image_features.float(), text_features.float()
    if kind == "clip":
        return clip_loss(img, txt, logit_scale.float(), local=local)
    if kind == "sigmoid":
        if logit_bias is None:
            raise ValueError(
                "the sigmoid loss needs a model with a logit_bias (logit_bias_init in its config)"
            )
        return sigmoid_loss(img, txt, logit_scale.float(), logit_bias.float())
    raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
