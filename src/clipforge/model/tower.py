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

from typing import Literal, Protocol, get_args

import torch
from torch import nn

TrunkOutput = torch.Tensor | tuple[torch.Tensor, ...]

Towers = Literal["both", "text", "image"]
"""Which towers a model holds: a query service needs the text tower alone, an image indexer the image tower."""
TOWERS: tuple[str, ...] = get_args(Towers)


class TowerNotLoadedError(RuntimeError):
    """A tower was called on a model loaded without it (`clipforge.load(path, towers=...)`)."""


def check_towers(towers: str) -> None:
    if towers not in TOWERS:
        raise ValueError(f"towers={towers!r}: expected one of {', '.join(TOWERS)}")


def not_loaded(tower: str) -> TowerNotLoadedError:
    """The error for calling `tower` ("image" or "text") on a model loaded without it."""
    other = "text" if tower == "image" else "image"
    return TowerNotLoadedError(
        f"this model was loaded with towers={other!r}, without its {tower} tower: load it with "
        f"towers='both' (or towers={tower!r}) to encode {tower}s"
    )


class AbsentTower(nn.Module):
    """Stands where a tower was not loaded: holds no tensors, and calling it says which tower is missing."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def init_weights(self) -> None:  # nothing to initialise
        pass

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise not_loaded(self.name)

    trunk = head = forward_tokens = forward


class Tower(Protocol):
    num_blocks: int

    def trunk(self, x: torch.Tensor, unlocked: int = 0) -> TrunkOutput: ...

    def head(self, feats: TrunkOutput, unlocked: int = 0) -> torch.Tensor: ...


def check_unlocked(unlocked: int, num_blocks: int, tower: str) -> None:
    if not 0 <= unlocked <= num_blocks:
        raise ValueError(
            f"unlocked={unlocked}: the {tower} tower has {num_blocks} unlockable blocks (0..{num_blocks})"
        )
