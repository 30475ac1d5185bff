"""Writing models: the clipforge directory (which Hugging Face transformers also loads for ViT towers) and
OpenAI-layout state dicts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clipforge._version import __version__
from clipforge.atomic import atomic_path
from clipforge.checkpoint.common import FORMAT_FILE, FORMAT_VERSION, OPENAI_WEIGHTS_FILE, WEIGHTS_FILE
from clipforge.model import convert
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.model.convert import CheckpointError
from clipforge.tokenizer import AnyTokenizer
from clipforge.transforms import to_hf_preprocessor_config


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """`write(name)` to a temp file that replaces `path` only once whole (safetensors and torch.save want a
    file name, not an open file)."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def _layout(cfg: CLIPConfig) -> str:
    """Weights' names in a saved directory: the most widely read layout that holds the model's towers."""
    if isinstance(cfg.vision, VisionConfig) and isinstance(cfg.text, TextConfig):
        return "hf" if cfg.vision.kind == "vit" else "openai"
    return "clipforge"


def export_state_dict(model: CLIP, layout: str) -> convert.StateDict:
    """fp32 CPU tensors of `model` in a layout: "hf" (transformers' CLIPModel), "openai" or "clipforge"."""
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if layout == "clipforge":
        return sd
    return convert.to_hf(sd) if layout == "hf" else convert.to_openai(sd)


def save_openai(model: CLIP, path: str | Path) -> Path:
    """A state dict in OpenAI's layout, which OpenAI's and OpenCLIP's code load: .safetensors or a .pt pickle of
    tensors only (loads with weights_only=True)."""
    if _layout(model.config) == "clipforge":
        raise CheckpointError(
            "OpenAI's layout has no EfficientNet or BERT towers: save a clipforge directory"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = export_state_dict(model, "openai")
    if path.suffix == ".safetensors":
        _atomic_write(path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    else:
        _atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path


def save_model(
    model: CLIP, directory: str | Path, tokenizer: AnyTokenizer | None = None, extra: dict | None = None
) -> Path:
    """Write `model` (and its tokenizer) as a clipforge directory that Hugging Face also loads (ViT towers)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layout = _layout(cfg)
    sd = export_state_dict(model, layout)
    weights = OPENAI_WEIGHTS_FILE if layout == "openai" else WEIGHTS_FILE
    _atomic_write(out / weights, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    if layout == "hf":
        _write_json(out / "config.json", convert.hf_config(cfg))
    _write_json(out / "preprocessor_config.json", to_hf_preprocessor_config(cfg.preprocess))
    if tokenizer is not None:
        tokenizer.save(out)
    meta = {
        "format": "clipforge",
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "weights": weights,
        "layout": layout,
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    _write_json(out / FORMAT_FILE, meta)  # written last: a directory without it is not a finished checkpoint
    return out
