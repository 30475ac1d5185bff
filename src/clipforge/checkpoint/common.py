"""What every checkpoint reader and writer shares: file names, `Loaded`, JSON and tensor-file reading, the
checks every load passes (no inflating views, no NaN), and the choice of tokenizer."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from clipforge.model import convert
from clipforge.model.config import CLIPConfig
from clipforge.model.convert import CheckpointError
from clipforge.tokenizer import AnyTokenizer, get_tokenizer
from clipforge.torchscript_reader import is_torchscript, read_torchscript

FORMAT_FILE = "clipforge.json"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# ResNet towers' weights, in OpenAI's layout: under a name transformers does not look for, so that it refuses
# the directory rather than filling a default ViT with random weights.
OPENAI_WEIGHTS_FILE = "openai_model.safetensors"

KeyFilter = Callable[[str], bool]
"""Which tensors of a file to keep, by their name in the file (see `convert.tower_of`)."""


@dataclass(frozen=True)
class ReadOptions:
    """What a reader needs beyond the path: `preset` names the architecture of a bare state dict (else it is
    inferred from shapes), `activation` overrides the one the file records (or lacks), `keep` selects tensors."""

    preset: str | None = None
    activation: str | None = None
    keep: KeyFilter | None = None


@dataclass
class Loaded:
    """A checkpoint read from disk, before a model is built from it."""

    config: CLIPConfig
    state_dict: convert.StateDict  # clipforge names
    tokenizer: AnyTokenizer | None
    source: str  # what was read, for messages: "OpenAI TorchScript archive /x/ViT-B-32.pt"


def read_state_dict(path: str | Path, keep: KeyFilter | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a .safetensors / .pt / .bin / .pth file, without running pickled or TorchScript code.

    `keep` selects tensors by name: a safetensors file reads only those; other formats drop the rest after
    reading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        sd, source = _read_safetensors(path, keep), f"safetensors file {path}"
    elif is_torchscript(path):
        sd, source = read_torchscript(path), f"TorchScript archive {path}"
    else:
        sd, source = _read_pickled_state_dict(path), f"state dict {path}"
    if keep is not None:
        sd = {k: v for k, v in sd.items() if keep(k)}
    _refuse_inflating_views(sd, path)
    return sd, source


def _read_safetensors(path: Path, keep: KeyFilter | None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:  # reads the tensors asked for, by name
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = next(iter(str(e).splitlines()), "")  # torch's messages run to pages; some errors have none
        raise CheckpointError(
            f"{path}: refusing to load. It is not a plain tensor state dict that loads with weights_only=True, "
            f"and unpickling arbitrary objects could run code ({type(e).__name__}: {why}). "
            "Re-save its state_dict() with a tool you trust, or convert it to safetensors."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    return convert.unwrap(obj)


def _refuse_inflating_views(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A pickled tensor may view its storage with zero strides: a few bytes on disk that claim terabytes once
    the weights are copied. No saved weight is such a view."""
    for k, v in sd.items():
        if v.numel() * v.element_size() > v.untyped_storage().nbytes():
            raise CheckpointError(
                f"{path}: tensor {k} of shape {tuple(v.shape)} views more elements than its storage holds"
            )


def refuse_non_finite(loaded: Loaded) -> None:
    """NaN or infinite weights make every embedding NaN; say which tensors hold them instead."""
    bad = [k for k, v in loaded.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointError(f"{loaded.source}: {len(bad)} tensor(s) hold NaN or infinite values: {shown}")


def read_tokenizer(directory: Path, context_length: int) -> AnyTokenizer | None:
    if (directory / "tokenizer.json").exists() or (directory / "vocab.json").exists():
        return get_tokenizer(directory, context_length=context_length)
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a UTF-8 file; NaN and Infinity, which JSON lacks, are refused too."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, ValueError, RecursionError) as e:  # bad UTF-8 and bad JSON are ValueErrors
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def choose_tokenizer(
    found: AnyTokenizer | None, vocab: str | Path | None, cfg: CLIPConfig, source: str
) -> AnyTokenizer | None:
    """The tokenizer a loaded model runs with: `vocab` if given, else the checkpoint's own, else None with a
    warning; refused when its kind (BPE, WordPiece) or vocabulary size is not the text tower's."""
    tokenizer = get_tokenizer(vocab, context_length=cfg.text.context_length) if vocab else found
    if tokenizer is None:
        warnings.warn(
            f"{source} carries no vocabulary, so the tokenizer is None; pass vocab=PATH "
            "(a bpe_simple_vocab_16e6.txt.gz file or a tokenizer directory) to get one",
            stacklevel=3,
        )
    elif tokenizer.kind != cfg.text.tokenizer_kind:
        raise CheckpointError(
            f"a {tokenizer.kind} tokenizer cannot feed the text tower of {source}, which reads "
            f"{cfg.text.tokenizer_kind} tokens"
        )
    elif tokenizer.vocab_size != cfg.text.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's text tower expects "
            f"{cfg.text.vocab_size}: wrong vocabulary for {source}"
        )
    return tokenizer
