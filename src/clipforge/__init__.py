"""clipforge: train, load, run and serve CLIP image-text models.

    model, preprocess, tokenizer = clipforge.load("path/to/checkpoint")

Heavy optional dependencies (FAISS, FastAPI, webdataset, ...) are imported where they are used, so importing
clipforge needs only torch and the core requirements.
"""

from clipforge._version import __version__
from clipforge.checkpoint import CheckpointError, load, save_model
from clipforge.model import CLIP, CLIPConfig, create_model, get_config, list_models
from clipforge.model.tower import TowerNotLoadedError
from clipforge.tokenizer import Tokenizer, get_tokenizer, train_tokenizer
from clipforge.transforms import ImageError, Preprocess, load_image
from clipforge.zeroshot import ZeroShotClassifier

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CheckpointError",
    "ImageError",
    "Preprocess",
    "Tokenizer",
    "TowerNotLoadedError",
    "ZeroShotClassifier",
    "__version__",
    "create_model",
    "get_config",
    "get_tokenizer",
    "list_models",
    "load",
    "load_image",
    "save_model",
    "train_tokenizer",
]
