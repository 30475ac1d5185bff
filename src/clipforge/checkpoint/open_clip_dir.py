"""An OpenCLIP directory: open_clip_config.json beside an OpenAI-layout state dict; the config says the
activation and preprocessing, the tensors' shapes say the architecture."""

from __future__ import annotations

from pathlib import Path

from clipforge.checkpoint.common import Loaded, ReadOptions, read_json, read_state_dict, read_tokenizer
from clipforge.model import config_json, convert
from clipforge.model.config import PreprocessConfig
from clipforge.model.convert import CheckpointError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def probe(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).exists()


def read(d: Path, options: ReadOptions) -> Loaded:
    file = d / CONFIG_FILE
    meta = read_json(file)
    weights = [d / n for n in WEIGHTS_FILES if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: OpenCLIP directory without {' or '.join(WEIGHTS_FILES)}")
    sd, _ = read_state_dict(weights[0], options.keep)
    sd = convert.from_openai(sd)
    activation = options.activation
    try:
        model_cfg = config_json.get(meta, "model_cfg", dict, "", {})
        p = config_json.get(meta, "preprocess_cfg", dict, "", {})
        if activation is None:
            activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        cfg = convert.infer_config(sd, activation=activation)
        triple = tuple[float, float, float]
        pre = PreprocessConfig(
            image_size=cfg.vision.image_size,
            mean=tuple(config_json.get(p, "mean", triple, "preprocess_cfg", cfg.preprocess.mean)),
            std=tuple(config_json.get(p, "std", triple, "preprocess_cfg", cfg.preprocess.std)),
            interpolation=config_json.get(p, "interpolation", str, "preprocess_cfg", "bicubic"),
            resize_mode="squash" if p.get("resize_mode") == "squash" else "shortest",
        )
    except CheckpointError:  # from infer_config, naming the tensors
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    cfg = cfg.replace(preprocess=pre)
    return Loaded(cfg, sd, read_tokenizer(d, cfg.text.context_length), f"OpenCLIP directory {d}")
