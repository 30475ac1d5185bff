"""A CLIP model whose towers start from pretrained unimodal weights, with new projections, for locked-tower
training (LiT, Zhai et al., 2022): EfficientNet-Lite0 (ImageNet) for images, all-MiniLM-L6-v2
(sentence-transformers) for text, as `clipforge data fetch-towers` unpacks them into the towers folder:

    <towers>/efficientnet-lite0/efficientnet-lite0-57934424.pth
    <towers>/minilm-l6-v2/{config.json, model.safetensors, tokenizer.json, 1_Pooling/config.json}

The text tower's tokenizer is the folder's tokenizer.json: `clipforge.get_tokenizer(<towers>/minilm-l6-v2)`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from clipforge.model import convert
from clipforge.model.clip import CLIP
from clipforge.model.config import BertTextConfig, EfficientNetConfig
from clipforge.model.convert import CheckpointError, StateDict

# Folder of each tower kind's weights under the towers folder.
TOWER_DIRS = {"efficientnet": "efficientnet-lite0", "bert": "minilm-l6-v2"}
EFFICIENTNET_FILE = "efficientnet-lite0-57934424.pth"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: run `clipforge data fetch-towers`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def read_bert_dir(directory: str | Path, context_length: int = 64) -> tuple[BertTextConfig, StateDict]:
    """A sentence-transformers BERT folder -> (its text tower config, weights in the tower's names)."""
    from clipforge.wordpiece import WordPieceTokenizer

    d = Path(directory)
    tok = WordPieceTokenizer.from_pretrained(d, context_length=context_length)
    cfg = convert.bert_config_from_hf(
        _read_json(d / "config.json"),
        _read_json(d / "1_Pooling" / "config.json"),
        context_length=context_length,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
    )
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: run `clipforge data fetch-towers`")
    try:
        sd = load_file(weights)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    return cfg, convert.from_bert(sd)


def read_efficientnet(path: str | Path) -> StateDict:
    """An EfficientNet-PyTorch .pth (a plain state dict) -> weights in the image tower's names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `clipforge data fetch-towers`")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a plain tensor state dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(sd).__name__}")
    return convert.from_efficientnet_pytorch(sd)


def _load_tower(tower: nn.Module, sd: StateDict, source: str, fresh: tuple[str, ...]) -> None:
    convert.check_state_dict(tower, sd, source, fresh=fresh)
    tower.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)


def _check_text_config(model_cfg: BertTextConfig, found: BertTextConfig, source: Path) -> None:
    """The tower's config must be the checkpoint's (its context length aside, which is the model's choice)."""
    found = dataclasses.replace(found, context_length=model_cfg.context_length)
    if found != model_cfg:
        diffs = [
            f"{f.name}: model {getattr(model_cfg, f.name)!r} vs checkpoint {getattr(found, f.name)!r}"
            for f in dataclasses.fields(found)
            if getattr(found, f.name) != getattr(model_cfg, f.name)
        ]
        raise CheckpointError(f"{source} does not fit the text tower: " + "; ".join(diffs))


def load_pretrained_towers(model: CLIP, towers_dir: str | Path) -> list[str]:
    """Load every tower of `model` that has pretrained weights in `towers_dir`, strictly (every tensor present
    and of the right shape, nothing left over but the tensors dropped on purpose); projections stay as
    initialised. Returns the folders loaded."""
    root = Path(towers_dir)
    loaded = []
    if isinstance(model.config.vision, EfficientNetConfig):
        path = root / TOWER_DIRS["efficientnet"] / EFFICIENTNET_FILE
        _load_tower(model.visual, read_efficientnet(path), str(path), fresh=model.visual.head_names)
        loaded.append(str(path.parent))
    if isinstance(model.config.text, BertTextConfig):
        d = root / TOWER_DIRS["bert"]
        found, sd = read_bert_dir(d, model.config.text.context_length)
        _check_text_config(model.config.text, found, d)
        _load_tower(model.text, sd, str(d), fresh=("text_projection",))
        loaded.append(str(d))
    if not loaded:
        kinds = (getattr(model.config.vision, "kind", "?"), getattr(model.config.text, "kind", "transformer"))
        raise ValueError(
            f"no pretrained weights for towers of kinds {kinds}; available: {sorted(TOWER_DIRS)}"
        )
    return loaded
