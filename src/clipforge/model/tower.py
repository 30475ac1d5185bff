"""The split of a tower into a trunk and a head, which locked-tower training (LiT) and its feature cache use.

Every tower (image or text) offers:

    tower.num_blocks                     how many top blocks can be left unlocked
    tower.trunk(x, unlocked=0)           the representation at the input of the last `unlocked` blocks; for
                                         unlocked == 0 the pooled features right before the projection
    tower.head(feats, unlocked=0)        the last `unlocked` blocks, the final norm, pooling and the projection
    tower(x) == tower.head(tower.trunk(x, n), n)      for every n in 0..num_blocks

A trunk returns a tensor or a tuple of tensors, each per sample along dim 0 (so rows can be cached, gathered
and split into micro-batches). A text tower with unlocked > 0 returns what its head needs besides the hidden
states (the pooling position, or the token ids for a padding mask). Trunk outputs have the same per-sample shape
for every batch when the tower's `trim` attribute (if it has one) is False; the feature cache relies on it.
"""

from __future__ import annotations

from typing import Protocol

import torch

TrunkOutput = torch.Tensor | tuple[torch.Tensor, ...]


class Tower(Protocol):
    num_blocks: int

    def trunk(self, x: torch.Tensor, unlocked: int = 0) -> TrunkOutput: ...

    def head(self, feats: TrunkOutput, unlocked: int = 0) -> torch.Tensor: ...


def check_unlocked(unlocked: int, num_blocks: int, tower: str) -> None:
    if not 0 <= unlocked <= num_blocks:
        raise ValueError(
            f"unlocked={unlocked}: the {tower} tower has {num_blocks} unlockable blocks (0..{num_blocks})"
        )
