"""CLIP (Radford et al., 2021): an image tower and a text tower projected into one embedding space, compared by
cosine similarity scaled by a learned temperature."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.bert import BertTextTower
from clipforge.model.config import BertTextConfig, CLIPConfig, EfficientNetConfig
from clipforge.model.efficientnet import EfficientNetLite
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.text import TextTransformer
from clipforge.model.tower import AbsentTower, Towers, check_towers
from clipforge.model.vit import VisionTransformer

MAX_LOGIT_SCALE = 100.0  # the paper clips the temperature so logits are scaled by at most 100


class CLIPOutput(NamedTuple):
    image_features: torch.Tensor | None  # (B, D), L2-normalised
    text_features: torch.Tensor | None  # (N, D), L2-normalised
    logit_scale: torch.Tensor  # scalar, exp of the learned log-scale, clamped to 100
    logit_bias: torch.Tensor | None  # scalar, only for models trained with the sigmoid loss


def _image_tower(config: CLIPConfig) -> nn.Module:
    v = config.vision
    if isinstance(v, EfficientNetConfig):
        return EfficientNetLite(v, config.embed_dim, config.preprocess)
    if v.kind == "vit":
        return VisionTransformer(v, config.embed_dim, config.activation)
    return ModifiedResNet(v, config.embed_dim)


def _text_tower(config: CLIPConfig) -> nn.Module:
    if isinstance(config.text, BertTextConfig):
        return BertTextTower(config.text, config.embed_dim)
    return TextTransformer(config.text, config.embed_dim, config.activation)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig, towers: Towers = "both"):
        """`towers` = "text" or "image" builds only that tower; the other is an `AbsentTower`, which holds no
        tensors and raises TowerNotLoadedError when called."""
        super().__init__()
        check_towers(towers)
        self.config = config
        self.towers = towers
        self.visual = _image_tower(config) if towers != "text" else AbsentTower("image")
        self.text = _text_tower(config) if towers != "image" else AbsentTower("text")
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = None
        if config.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        self.init_weights()

    def keep_towers(self, towers: Towers) -> CLIP:
        """Drop the tower `towers` leaves out (an AbsentTower takes its place), freeing its weights: for a
        process that had to read both (to check a collection's fingerprint) but runs one."""
        check_towers(towers)
        if towers == "text":
            self.visual = AbsentTower("image")
        elif towers == "image":
            self.text = AbsentTower("text")
        if towers != "both":
            self.towers = towers
        return self

    def init_weights(self) -> None:
        self.visual.init_weights()
        self.text.init_weights()

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.logit_scale.dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, embed_dim) projected features."""
        f = self.visual(images.to(self.dtype))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, T) token ids -> (N, embed_dim) projected features."""
        f = self.text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        return CLIPOutput(image_features, text_features, self.scale(), self.logit_bias)

    def logits(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B, N), logits_per_text (N, B)), as OpenAI's forward returns them."""
        img, txt, scale, bias = self(images, tokens)
        per_image = scale * img @ txt.t()
        if bias is not None:
            per_image = per_image + bias
        return per_image, per_image.t()
