"""AdamW parameter groups, the cosine schedule with linear warm-up, and tower locking for fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from clipforge.model.layers import LayerNorm


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Gains, biases, the logit scale/bias (all < 2-D) and embeddings are not decayed: shrinking them towards
    zero changes what the model computes, not only how complex it is."""
    return p.ndim < 2 or "embedding" in name


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    pretrained: Collection[str] = (),
    pretrained_lr_scale: float = 1.0,
) -> list[dict]:
    """Up to four groups: (decayed or not) x (loaded by --init or new). Each carries `lr_scale`, the factor
    the schedule's learning rate is multiplied by; frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((no_decay(name, p), name in pretrained), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if nd else weight_decay,
            "lr_scale": pretrained_lr_scale if pre else 1.0,
        }
        for (nd, pre), params in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))


def lr_at(step: int, *, base: float, total: int, warmup: int, minimum: float = 0.0) -> float:
    """Linear warm-up from base/warmup to base over `warmup` steps, then a cosine decay to `minimum` at `total`.
    `step` counts from 0 (the learning rate of the first update)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def lock_tower(tower: nn.Module, norm_trainable: bool = False, keep: Collection[nn.Parameter] = ()) -> None:
    """Freeze a tower's weights (LiT) except `keep` (its head); optionally leave its normalisation layers
    (LayerNorm, BatchNorm) trainable."""
    kept = {id(p) for p in keep}
    for module in tower.modules():
        is_norm = isinstance(module, (LayerNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
        for p in module.parameters(recurse=False):
            p.requires_grad_((norm_trainable and is_norm) or id(p) in kept)


def freeze_batchnorm_stats(tower: nn.Module) -> None:
    """A locked ResNet tower keeps its BatchNorm running statistics: eval mode for those layers only."""
    for module in tower.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
