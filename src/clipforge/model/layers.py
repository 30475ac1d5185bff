"""The Transformer pieces both towers share: pre-LN residual blocks with fused q/k/v attention through SDPA.

Parameter names follow OpenAI's CLIP (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...) so that its checkpoints and
OpenCLIP's load with no renaming inside the towers; only the convert modules know any other naming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_unlocked(unlocked: int, num_blocks: int) -> None:
    """Towers split for locked-tower training take `unlocked` in [0, num_blocks]: the trailing blocks to run."""
    if not 0 <= unlocked <= num_blocks:
        raise ValueError(f"unlocked must be in [0, {num_blocks}] (the tower's blocks), got {unlocked}")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; valid: 'quick_gelu', 'gelu'")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, so fp16 weights loaded from OpenAI checkpoints stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and self.weight.dtype == torch.float32:
            return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(
                x.dtype
            )
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and SDPA (flash / memory-efficient kernels)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` (B, 1, 1, T) bool: the keys each text may attend to (False at padding)."""
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, hd)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)
        )

    def forward(
        self, x: torch.Tensor, causal: bool = False, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        """Blocks [start, stop) only: a tower's trunk runs the lower ones, its head the top ones."""
        for block in self.resblocks[start:stop]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenAI's scheme: residual-branch outputs scaled down with depth so the stream's variance stays put."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
