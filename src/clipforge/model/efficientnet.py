"""EfficientNet-Lite0 image tower (Tan & Le, 2019; the Lite variants of the TensorFlow reference drop
squeeze-excite, use ReLU6 and keep the stem and head unscaled), global average pooling, then a linear
projection into CLIP's joint space.

MBConv (Sandler et al., 2018): expand 1x1 (when the ratio is not 1), depthwise kxk, project 1x1 (linear), each
with BatchNorm; a residual connection when the shape is kept. Convolutions pad as TensorFlow's 'SAME' does,
which the ported ImageNet weights were trained with: for a stride of 2 the extra row and column go to the
bottom and right (PyTorch's symmetric k//2 shifts every strided feature map by a pixel).

For locked-tower training (LiT) the tower splits before any block: `trunk(x, n)` runs up to the input of the
last `n` blocks and `head(feats, n)` runs the rest, with `forward(x) == head(trunk(x, n), n)`. The blocks are
the 16 MBConv blocks then the head convolution (1x1 to 1280), so `num_blocks` is 17 and unlocking 1 block
trains only the head convolution; the stem always stays in the trunk.

Two options of the config are clipforge's, for the default model (measured in BENCHMARKS.md, "The default
model"): `pool="multiscale"` feeds the projection the pooled outputs of stages 4-7 and a colour histogram of the
input beside the head's 1,280 features, and `head="mlp"` adds a residual MLP to the linear projection (open_clip's
timm towers offer an MLP projection too). The reference is `pool="avg"`, `head="linear"`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.config import EfficientNetConfig, PreprocessConfig
from clipforge.model.layers import check_unlocked

BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the ported weights were trained with
STEM_WIDTH, HEAD_WIDTH = 32, 1280
COLOUR_LEVELS = 4  # per channel: a 4x4x4 histogram, 64 bins
# Lite0's stages: (expand ratio, kernel, stride of the first block, output channels, blocks).
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding of one spatial side: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a random subset of samples, rescaling the rest."""
    if not training or rate == 0.0:
        return x
    keep = x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class ConvBN(nn.Module):
    """Convolution (no bias), BatchNorm and optionally ReLU6, with 'SAME' padding."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
    ):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        # Stride 1 with an odd kernel is symmetric 'SAME' padding, which the convolution does itself.
        pad = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            top, bottom = same_padding(x.shape[-2], self.kernel, self.stride)
            left, right = same_padding(x.shape[-1], self.kernel, self.stride)
            x = F.pad(x, (left, right, top, bottom))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite."""

    def __init__(self, c_in: int, c_out: int, expand_ratio: int, kernel: int, stride: int, drop_rate: float):
        super().__init__()
        mid = c_in * expand_ratio
        self.expand = ConvBN(c_in, mid, 1) if expand_ratio != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, c_out, 1, act=False)  # linear bottleneck
        self.residual = stride == 1 and c_in == c_out
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return x + drop_path(h, self.drop_rate, self.training) if self.residual else h


def colour_histogram(pixels: torch.Tensor, levels: int = COLOUR_LEVELS) -> torch.Tensor:
    """(B, 3, H, W) pixels in [0, 1] -> (B, levels**3) fraction of pixels in each RGB cell."""
    q = (pixels.clamp(0, 1) * levels).long().clamp(max=levels - 1)
    cell = ((q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]).flatten(1)
    # Counted in float32 whatever the model's dtype: bfloat16 stops counting at 256 (its 8-bit mantissa).
    counts = torch.zeros(cell.shape[0], levels**3, device=pixels.device)
    counts.scatter_add_(1, cell, torch.ones_like(cell, dtype=counts.dtype))
    return (counts / cell.shape[1]).to(pixels.dtype)


class MLPHead(nn.Module):
    """A residual MLP beside the linear projection: the tower's output is `feats @ proj + mlp(feats)`."""

    def __init__(self, width: int, hidden: int, embed_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EfficientNetLite(nn.Module):
    def __init__(self, cfg: EfficientNetConfig, embed_dim: int, preprocess: PreprocessConfig | None = None):
        super().__init__()
        self.multiscale = cfg.pool == "multiscale"
        self.stem = ConvBN(3, STEM_WIDTH, 3, stride=2)
        n_blocks = sum(stage[-1] for stage in STAGES)
        blocks, c_in, self.stage_ends = [], STEM_WIDTH, []
        for expand_ratio, kernel, stride, c_out, repeats in STAGES:
            for i in range(repeats):
                # The reference scales the drop rate linearly with the block's index.
                rate = cfg.drop_path_rate * len(blocks) / n_blocks
                blocks.append(MBConv(c_in, c_out, expand_ratio, kernel, stride if i == 0 else 1, rate))
                c_in = c_out
            self.stage_ends.append(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.top = ConvBN(
            c_in, HEAD_WIDTH, 1
        )  # the head convolution (named as Keras does, `head` is a method)
        width = HEAD_WIDTH
        # the blocks after which trunk() keeps a global average: the ends of stages 4-7 when multiscale
        self.pooled_ends = frozenset(self.stage_ends[3:] if self.multiscale else ())
        if self.multiscale:
            width += sum(stage[3] for stage in STAGES[3:]) + COLOUR_LEVELS**3
            # The histogram reads pixels, so the tower undoes the normalisation the config gives. Plain
            # floats, not buffers: the config is what a checkpoint stores, and loaders that build on the meta
            # device leave non-persistent buffers empty.
            pre = preprocess or PreprocessConfig(image_size=cfg.image_size)
            self.pixel_mean, self.pixel_std = tuple(pre.mean), tuple(pre.std)
        self.width = width
        self.proj = nn.Parameter(torch.empty(width, embed_dim))  # new in CLIP: no bias, as CLIP's
        self.mlp = MLPHead(width, cfg.head_hidden, embed_dim) if cfg.head == "mlp" else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """He initialisation (fan out) of the convolutions, as the reference; BatchNorm starts as identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.proj, std=self.width**-0.5)
        if self.mlp is not None:
            self.mlp.fc1.reset_parameters()
            self.mlp.fc2.reset_parameters()

    @property
    def head_names(self) -> tuple[str, ...]:
        """The tensors that are new in CLIP (a pretrained ImageNet checkpoint holds none of them)."""
        return tuple(n for n in self.state_dict() if n == "proj" or n.startswith("mlp."))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) + 1  # the MBConv blocks, then the head convolution

    def _units(self) -> list[nn.Module]:
        return [*self.blocks, self.top]

    def trunk(self, x: torch.Tensor, unlocked: int = 0) -> torch.Tensor:
        """(B, 3, H, W) images -> the (B, C, h, w) input of the last `unlocked` blocks; for unlocked == 0, the
        pooled (B, self.width) features before the projection (1,280, or 2,048 when multiscale)."""
        check_unlocked(unlocked, self.num_blocks)
        if self.multiscale and unlocked:
            raise ValueError(
                "pool='multiscale' pools every stage from the 4th on, so the trunk cannot stop inside the "
                "tower: unlock no image blocks (or use pool='avg')"
            )
        x = x.to(self.stem.conv.weight.dtype)
        pooled = [colour_histogram(self._pixels(x))] if self.multiscale else []
        x = self.stem(x)
        for i, unit in enumerate(self._units()[: self.num_blocks - unlocked]):
            x = unit(x)
            if i in self.pooled_ends:
                pooled.append(x.mean(dim=(2, 3)))
        if unlocked:
            return x
        return torch.cat([x.mean(dim=(2, 3)), *pooled], dim=1) if pooled else x.mean(dim=(2, 3))

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x * std + mean

    def head(self, feats: torch.Tensor, unlocked: int = 0) -> torch.Tensor:
        """The last `unlocked` blocks, pooling and the projection: trunk's output -> (B, embed_dim)."""
        check_unlocked(unlocked, self.num_blocks)
        for unit in self._units()[self.num_blocks - unlocked :]:
            feats = unit(feats)
        if unlocked:
            feats = feats.mean(dim=(2, 3))
        out = feats @ self.proj
        return out + self.mlp(feats) if self.mlp is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, embed_dim)
        return self.head(self.trunk(x))
