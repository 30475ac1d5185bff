from clipforge.model.clip import CLIP, CLIPOutput
from clipforge.model.config import (
    BertTextConfig,
    CLIPConfig,
    EfficientNetConfig,
    PreprocessConfig,
    TextConfig,
    VisionConfig,
)
from clipforge.model.registry import create_model, get_config, list_models, pretrained_towers

__all__ = [
    "CLIP",
    "CLIPOutput",
    "BertTextConfig",
    "CLIPConfig",
    "EfficientNetConfig",
    "PreprocessConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
    "pretrained_towers",
]
