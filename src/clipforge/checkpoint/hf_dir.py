"""A Hugging Face transformers CLIPModel directory: config.json, model.safetensors or pytorch_model.bin."""

from __future__ import annotations

from pathlib import Path

from clipforge.checkpoint.common import Loaded, ReadOptions, read_json, read_state_dict, read_tokenizer
from clipforge.model import convert
from clipforge.model.convert import CheckpointError
from clipforge.transforms import from_hf_preprocessor_config


def probe(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def read(d: Path, options: ReadOptions) -> Loaded:
    hf = read_json(d / "config.json")
    pre = None
    if (d / "preprocessor_config.json").exists():
        try:
            pre = from_hf_preprocessor_config(read_json(d / "preprocessor_config.json"))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{d / 'preprocessor_config.json'}: {e}") from None
    try:
        cfg = convert.config_from_hf(hf, pre)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    weights = [d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: Hugging Face directory without model.safetensors or pytorch_model.bin")
    sd, _ = read_state_dict(weights[0], options.keep)
    return Loaded(
        cfg, convert.from_hf(sd), read_tokenizer(d, cfg.text.context_length), f"Hugging Face directory {d}"
    )
