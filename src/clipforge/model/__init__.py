from clipforge.model.clip import CLIP, CLIPOutput
from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.model.registry import create_model, get_config, list_models

__all__ = [
    "CLIP",
    "CLIPOutput",
    "CLIPConfig",
    "PreprocessConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_config",
    "list_models",
]
