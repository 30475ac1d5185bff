"""Vision Transformer image tower (Dosovitskiy et al.), as CLIP uses it: an extra LayerNorm before the blocks."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.model.config import VisionConfig
from clipforge.model.layers import LayerNorm, Transformer
from clipforge.model.tower import check_unlocked


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str):
        super().__init__()
        w = cfg.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.grid_size**2 + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_post = LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))

    def init_weights(self) -> None:
        self.transformer.init_weights()

    @property
    def num_blocks(self) -> int:
        return self.transformer.layers

    def _tokens(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 1 + grid^2, width) tokens after the first `stop` blocks; token 0 is the
        class token."""
        x = self.conv1(x)  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x), stop=stop)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, W): the class token, normalised
        return self.ln_post(x[:, 0])

    def trunk(self, x: torch.Tensor, unlocked: int = 0) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width) pooled features (unlocked = 0), else (B, 1 + grid^2, width) tokens at the
        input of the last `unlocked` blocks."""
        check_unlocked(unlocked, self.num_blocks, "image")
        x = self._tokens(x, self.num_blocks - unlocked)
        return self._pool(x) if unlocked == 0 else x

    def head(
        self, feats: torch.Tensor, unlocked: int = 0
    ) -> torch.Tensor:  # trunk(x, unlocked) -> (B, embed_dim)
        check_unlocked(unlocked, self.num_blocks, "image")
        if unlocked:
            feats = self._pool(self.transformer(feats, start=self.num_blocks - unlocked))
        return feats @ self.proj

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 1 + grid^2, width) tokens after ln_post; token 0 is the class token."""
        return self.ln_post(self._tokens(x, self.num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, embed_dim)
        return self.head(self.trunk(x))
