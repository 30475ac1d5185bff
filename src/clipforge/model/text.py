"""Causal text Transformer over BPE tokens, pooled at the end-of-text token and projected."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.model.config import TextConfig
from clipforge.model.layers import LayerNorm, Transformer
from clipforge.model.tower import check_unlocked


def eot_positions(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """(N, T) ids -> (N,) index of the first end-of-text token per row; rows without one fall back to the largest
    id, as OpenAI's argmax pooling does (its end-of-text token is the largest id)."""
    is_eot = tokens == eot_token_id
    return torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1), tokens.argmax(dim=-1))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, activation: str):
        super().__init__()
        self.context_length = cfg.context_length
        self.eot_token_id = cfg.eot_token_id
        # Causal attention means no token after the end-of-text token changes the pooled feature, so running
        # only up to the longest text in the batch gives identical outputs for a fraction of the work. It reads
        # the batch's lengths on the host; `trim = False` keeps shapes static (ONNX export, CUDA graphs).
        self.trim = True
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return eot_positions(tokens, self.eot_token_id)

    @property
    def num_blocks(self) -> int:
        return self.transformer.layers

    def _pool(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # (B, T, W), (B,) -> (B, W)
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), pos])

    def _trimmed(self) -> bool:
        return self.trim and not torch.jit.is_tracing() and not torch.compiler.is_compiling()

    def trunk(
        self, tokens: torch.Tensor, unlocked: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> (B, width) pooled features (unlocked = 0), else ((B, T', width) hidden states at the
        input of the last `unlocked` blocks, (B,) pooling positions); T' <= T, T' = T when `trim` is off.
        `positions` (T_max, width) replaces the position embeddings (a stretched copy reads longer texts)."""
        check_unlocked(unlocked, self.num_blocks, "text")
        positions = self.positional_embedding if positions is None else positions
        if tokens.shape[1] > positions.shape[0]:
            raise ValueError(
                f"text has {tokens.shape[1]} tokens; this model's context length is {positions.shape[0]}"
            )
        pos = self.eot_positions(tokens)
        if self._trimmed():
            tokens = tokens[:, : int(pos.max()) + 1]
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + positions[:T]
        x = self.transformer(x, causal=True, stop=self.num_blocks - unlocked)
        return self._pool(x, pos) if unlocked == 0 else (x, pos)

    def head(
        self, feats: torch.Tensor | tuple[torch.Tensor, torch.Tensor], unlocked: int = 0
    ) -> torch.Tensor:  # trunk(tokens, unlocked) -> (B, embed_dim)
        check_unlocked(unlocked, self.num_blocks, "text")
        if unlocked:
            x, pos = feats
            if self._trimmed():  # hidden states cached at full length: causal, so the tail changes nothing
                x = x[:, : int(pos.max()) + 1]
            feats = self._pool(self.transformer(x, causal=True, start=self.num_blocks - unlocked), pos)
        return feats @ self.text_projection

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:  # (B, T) -> (B, embed_dim)
        return self.head(self.trunk(tokens, positions=positions))
