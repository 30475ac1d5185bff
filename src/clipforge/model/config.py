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
BERT_POOLING = ("mean", "cls")


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
            raise ValueError(
                f"VisionConfig kind must be 'vit' or 'resnet', got {self.kind!r} (EfficientNetConfig is "
                "kind 'efficientnet')"
            )
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


POOLS = ("avg", "multiscale")  # EfficientNetConfig.pool
HEAD_FIELDS = ("head", "head_hidden")  # EfficientNetConfig fields that shape only the head, not the trunk


@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet-Lite0 image tower (Tan & Le, 2019, in its Lite form: ReLU6, no squeeze-excite). The stage
    table is Lite0's, fixed, so that the pretrained ImageNet weights fit it; only the input size and the
    stochastic depth of training vary."""

    kind: str = "efficientnet"
    image_size: int = 224
    # Stochastic depth: the rate of the last MBConv block, scaled down linearly towards the first (the
    # reference trains with 0.2); 0 keeps every block in training too.
    drop_path_rate: float = 0.0
    # What the projection reads. "avg": the global average of the head convolution (the reference, 1,280
    # values). "multiscale": beside it, the global averages of stages 4-7 (80, 112, 192 and 320 channels:
    # shapes, parts and textures the 1x1 head mixes away) and a 4x4x4 colour histogram of the input pixels
    # (drawings and emoji differ in colour that ImageNet features ignore), 2,048 values. Measured on the open
    # corpus's held-out concepts (BENCHMARKS.md): +2 points of zero-shot top-1, +4 of text->image R@10.
    pool: str = "avg"
    # The projection: "linear" (CLIP's), or "mlp": a residual MLP of `head_hidden` GELU units added to it.
    head: str = "linear"
    head_hidden: int = 1024

    def __post_init__(self) -> None:
        if self.kind != "efficientnet":
            raise ValueError(f"EfficientNetConfig kind must be 'efficientnet', got {self.kind!r}")
        if self.pool not in POOLS:
            raise ValueError(f"EfficientNetConfig pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.head not in ("linear", "mlp"):
            raise ValueError(f"EfficientNetConfig head must be 'linear' or 'mlp', got {self.head!r}")
        if self.head_hidden < 1:
            raise ValueError(f"EfficientNetConfig head_hidden must be positive, got {self.head_hidden}")
        if self.image_size < 32:
            raise ValueError(f"image_size {self.image_size} is below the tower's total stride, 32")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def patch_size(self) -> int:
        return 32  # the total stride: one feature per 32x32 pixels, as for the ResNet

    @property
    def grid_size(self) -> int:
        return math.ceil(self.image_size / self.patch_size)


@dataclass(frozen=True)
class TextConfig:
    """Causal text Transformer over CLIP's BPE tokens; pooled at the first end-of-text token."""

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

    @property
    def tokenizer_kind(self) -> str:
        return "bpe"


@dataclass(frozen=True)
class BertTextConfig:
    """BERT-family text tower (Devlin et al., 2019) over WordPiece tokens: bidirectional, post-LN, pooled by the
    masked mean of its outputs (Sentence-BERT, as all-MiniLM-L6-v2) or at [CLS]. The defaults are MiniLM-L6's."""

    kind: str = "bert"
    context_length: int = 64  # tokens per text, [CLS] and [SEP] included
    vocab_size: int = 30522
    width: int = 384
    heads: int = 12
    layers: int = 6
    mlp_ratio: float = 4.0
    max_positions: int = 512  # rows of the learned position table
    type_vocab_size: int = 2  # segment embeddings; every text is segment 0
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102

    def __post_init__(self) -> None:
        if self.kind != "bert":
            raise ValueError(f"BertTextConfig kind must be 'bert', got {self.kind!r}")
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.pooling not in BERT_POOLING:
            raise ValueError(f"pooling must be one of {BERT_POOLING}, got {self.pooling!r}")
        if not 2 <= self.context_length <= self.max_positions:
            raise ValueError(
                f"context_length {self.context_length} must be in [2, max_positions={self.max_positions}]"
            )
        for name in ("pad_token_id", "cls_token_id", "sep_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} is outside the vocabulary (size {self.vocab_size})"
                )

    # The names code written for CLIP's tokens reads (bucketing by length, ONNX export): [SEP] ends a text.
    @property
    def sot_token_id(self) -> int:
        return self.cls_token_id

    @property
    def eot_token_id(self) -> int:
        return self.sep_token_id

    @property
    def tokenizer_kind(self) -> str:
        return "wordpiece"


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


ImageTowerConfig = VisionConfig | EfficientNetConfig
TextTowerConfig = TextConfig | BertTextConfig
# Config class of each tower kind. CLIP's own text Transformer has no `kind` key, so its saved configs stay
# as they were.
VISION_KINDS: dict[str, type] = {
    "vit": VisionConfig,
    "resnet": VisionConfig,
    "efficientnet": EfficientNetConfig,
}
TEXT_KINDS: dict[str, type] = {"bert": BertTextConfig}


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: ImageTowerConfig
    text: TextTowerConfig
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
        vision = _build_tower(VISION_KINDS, VisionConfig, d.pop("vision"), "vision")
        text = _build_tower(TEXT_KINDS, TextConfig, d.pop("text"), "text")
        pre = d.pop("preprocess", None)
        preprocess = _build(PreprocessConfig, pre, "preprocess config") if pre is not None else None
        if preprocess is None:
            preprocess = PreprocessConfig(image_size=vision.image_size)
        return cls(vision=vision, text=text, preprocess=preprocess, **d)

    def replace(self, **changes: Any) -> CLIPConfig:
        """Copy with top-level fields or nested ones changed: `cfg.replace(text={"vocab_size": 4096})`."""
        towers = {"vision": (VISION_KINDS, VisionConfig), "text": (TEXT_KINDS, TextConfig)}
        for key in ("vision", "text", "preprocess"):
            new, old = changes.get(key), getattr(self, key)
            if not isinstance(new, dict):
                continue
            if key in towers and "kind" in new and towers[key][0].get(new["kind"]) is not type(old):
                changes[key] = _build_tower(*towers[key], new, key)  # a tower of another class: from scratch
            else:
                changes[key] = dataclasses.replace(old, **new)
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


def _build_tower(kinds: dict[str, type], default: type, d: dict[str, Any], what: str) -> Any:
    """The config of the tower kind `d["kind"]` names; without a kind, `default` (CLIP's own towers)."""
    if "kind" in d and d["kind"] not in kinds:
        valid = sorted(kinds) + ([] if hasattr(default, "kind") else ["none (CLIP's text Transformer)"])
        raise ValueError(f"unknown {what} tower kind {d['kind']!r}; valid kinds: {valid}")
    return _build(kinds.get(d.get("kind"), default), d, f"{what} config")
