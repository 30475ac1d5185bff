"""BERT text tower (Devlin et al., 2019) as sentence encoders use it (Sentence-BERT, Reimers & Gurevych, 2019):
a bidirectional post-LN Transformer over WordPiece tokens, padding masked out of attention, pooled by the
masked mean of its outputs (or at [CLS]), then projected linearly into CLIP's joint space.

For locked-tower training (LiT) the tower splits at any layer: `trunk(tokens, n)` runs up to the input of the
last `n` layers and `head(feats, n)` runs the rest, with `forward(tokens) == head(trunk(tokens, n), n)`.
`num_blocks` counts the layers; the embeddings always stay in the trunk.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.model.config import BertTextConfig
from clipforge.model.layers import MLP, Attention, LayerNorm, check_unlocked

# What trunk(tokens, n > 0) returns: hidden states (B, T, width) and the padding mask (B, T), True at tokens.
TextFeatures = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class PostLNBlock(nn.Module):
    """BERT's layer: each sub-layer's output is added to its input and the sum normalised (post-LN), unlike
    CLIP's pre-LN blocks. Exact GELU, as BERT."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, int(width * mlp_ratio), "gelu")
        self.ln_2 = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, T) -> (B, T, D)
        x = self.ln_1(x + self.attn(x, mask=mask[:, None, None, :]))
        return self.ln_2(x + self.mlp(x))


class BertTextTower(nn.Module):
    def __init__(self, cfg: BertTextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        # Rows after the longest text in a batch are padding that no token attends to and pooling skips, so
        # dropping them is exact. It reads the batch's lengths on the host; `trim = False` keeps shapes static.
        self.trim = True
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, w))
        self.segment_embedding = nn.Parameter(torch.empty(cfg.type_vocab_size, w))
        self.ln_embed = LayerNorm(w, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(
            PostLNBlock(w, cfg.heads, cfg.mlp_ratio, cfg.layer_norm_eps) for _ in range(cfg.layers)
        )
        self.text_projection = nn.Parameter(torch.empty(w, embed_dim))  # new in CLIP: no bias, as CLIP's

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's scheme (normal, std 0.02; zero biases) for a tower trained from scratch; pretrained towers
        overwrite all but the projection."""
        for p in (self.token_embedding.weight, self.positional_embedding, self.segment_embedding):
            nn.init.normal_(p, std=0.02)
        for block in self.blocks:
            for lin in (block.mlp.c_fc, block.mlp.c_proj, block.attn.out_proj):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.in_proj_weight, std=0.02)
            nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.normal_(self.text_projection, std=self.cfg.width**-0.5)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) bool, True at real tokens. Position 0 ([CLS]) always counts, so a row of only
        padding (which no tokenizer makes) stays finite instead of attending to nothing."""
        mask = tokens != self.cfg.pad_token_id
        mask[:, 0] = True
        return mask

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, width)
        T = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:T] + self.segment_embedding[0]
        return self.ln_embed(x)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D), (B, T) -> (B, D)
        if self.cfg.pooling == "cls":
            return x[:, 0]
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def _run_blocks(self, x: torch.Tensor, mask: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x

    def trunk(self, tokens: torch.Tensor, unlocked: int = 0) -> TextFeatures:
        """(B, T) ids -> the input of the last `unlocked` layers: (hidden (B, T, width), mask (B, T)); for
        unlocked == 0, the pooled (B, width) features before the projection. Hidden states keep all T rows, so
        each sample's features do not depend on the rest of its batch."""
        check_unlocked(unlocked, self.num_blocks)
        # BERT learned every row of its position table, so it reads past the context its tokenizer cuts at
        # (long="interpolate" in clipforge.long_text) up to the table's end, and no further.
        if tokens.shape[1] > self.cfg.max_positions:
            raise ValueError(
                f"text has {tokens.shape[1]} tokens; this model has {self.cfg.max_positions} positions"
            )
        mask = self.padding_mask(tokens)
        if unlocked == 0 and self.trim and not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            length = int(mask.any(dim=0).nonzero().max()) + 1  # the longest text
            tokens, mask = tokens[:, :length], mask[:, :length]
        x = self._run_blocks(self.embed(tokens), mask, self.blocks[: self.num_blocks - unlocked])
        return self.pool(x, mask) if unlocked == 0 else (x, mask)

    def head(self, feats: TextFeatures, unlocked: int = 0) -> torch.Tensor:
        """The last `unlocked` layers, pooling and the projection: trunk's output -> (B, embed_dim)."""
        check_unlocked(unlocked, self.num_blocks)
        if unlocked == 0:
            return feats @ self.text_projection
        x, mask = feats
        x = self._run_blocks(x, mask, self.blocks[self.num_blocks - unlocked :])
        return self.pool(x, mask) @ self.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, embed_dim)
        return self.head(self.trunk(tokens))
