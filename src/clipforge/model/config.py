"""Typed, frozen configuration of a CLIP model and of the image preprocessing it was trained with.

A checkpoint carries its own `CLIPConfig` (as JSON), so nothing about a saved model is guessed from tensor
shapes; shape inference exists only for importing foreign checkpoints that lack a config (see convert.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("quick_gelu", "gelu")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. `kind="vit"` takes an int `layers`; `kind="resnet"` takes four stage depths."""

    kind: str = "vit"
    image_size: int = 224
    width: int = 768
    layers: int | tuple[int, ...] = 12
    heads: int = 12
    patch_size: int = 32  # ViT; a ResNet's is fixed at its total stride, 32
    mlp_ratio: float = 4.0  # ViT only

    def __post_init__(self) -> None:
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision kind must be 'vit' or 'resnet', got {self.kind!r}")
        if self.kind == "resnet":
            layers = tuple(self.layers) if not isinstance(self.layers, int) else None
            if layers is None or len(layers) != 4:
                raise ValueError(f"a ResNet tower needs four stage depths, got layers={self.layers!r}")
            object.__setattr__(self, "layers", layers)
            object.__setattr__(
                self, "patch_size", 32
            )  # the ResNet's total stride: one feature per 32x32 pixels
        else:
            if not isinstance(self.layers, int):
                raise ValueError(f"a ViT tower needs an int number of layers, got {self.layers!r}")
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """Causal text Transformer; pooled at the first end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    sot_token_id: int = 49406
    eot_token_id: int = 49407
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        for name in ("sot_token_id", "eot_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})"
                )


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the model's input. Saved with every checkpoint: running a model with another
    size, mean/std or resize mode silently changes every embedding."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    # "shortest": resize the shorter side to image_size, then centre-crop (OpenAI, HF);
    # "squash": resize both sides to image_size, ignoring the aspect ratio.
    resize_mode: str = "shortest"
    # Decode large JPEGs at a reduced scale (Pillow's draft mode) before the final resize. Off by default:
    # see BENCHMARKS.md for its speed-up and how far it moves embeddings.
    fast_jpeg: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values (R, G, B)")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    # OpenAI's weights were trained with QuickGELU; running them with exact GELU changes every embedding.
    activation: str = "quick_gelu"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None  # a learned bias, used by the sigmoid (SigLIP) loss
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    name: str = ""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.preprocess.image_size != self.vision.image_size:
            raise ValueError(
                f"preprocess.image_size {self.preprocess.image_size} != vision.image_size {self.vision.image_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        _check_keys(cls, d, "model config")
        vision = _build(VisionConfig, d.pop("vision"), "vision config")
        text = _build(TextConfig, d.pop("text"), "text config")
        pre = d.pop("preprocess", None)
        preprocess = _build(PreprocessConfig, pre, "preprocess config") if pre is not None else None
        if preprocess is None:
            preprocess = PreprocessConfig(image_size=vision.image_size)
        return cls(vision=vision, text=text, preprocess=preprocess, **d)

    def replace(self, **changes: Any) -> CLIPConfig:
        """Copy with top-level fields or nested ones changed: `cfg.replace(text={"vocab_size": 4096})`."""
        for key in ("vision", "text", "preprocess"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        if "vision" in changes and "preprocess" not in changes:
            changes["preprocess"] = dataclasses.replace(
                self.preprocess, image_size=changes["vision"].image_size
            )
        return dataclasses.replace(self, **changes)


def _check_keys(cls: type, d: dict[str, Any], what: str) -> None:
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; valid keys: {sorted(valid)}")


def _build(cls: type, d: dict[str, Any], what: str) -> Any:
    _check_keys(cls, d, what)
    return cls(**d)
