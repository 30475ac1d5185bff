"""Reading and writing models on disk.

clipforge's own format is a directory that Hugging Face transformers also loads (config.json,
model.safetensors, tokenizer files, preprocessor_config.json) plus `clipforge.json`, which records the full
config (activation and preprocessing included) and the weights' layout:

- ViT image towers: weights in Hugging Face's CLIPModel names, so `CLIPModel.from_pretrained(dir)` works.
- ResNet image towers (which transformers lacks): weights in OpenAI's layout in `openai_model.safetensors`, which
  OpenAI's `build_model` and OpenCLIP read. With neither config.json nor a weights file of a name it knows,
  `CLIPModel.from_pretrained(dir)` raises OSError instead of building a randomly initialised ViT.
- Pretrained-tower kinds (EfficientNet-Lite, BERT): weights in clipforge's own names, no config.json either; the
  tokenizer is the tokenizer.json the text tower reads (WordPiece for BERT).

Foreign inputs: OpenAI `.pt` (state dicts and TorchScript archives), OpenCLIP state dicts (.pt/.bin/.safetensors,
or a directory with open_clip_config.json) and Hugging Face directories. No code from a checkpoint runs: pickles
load with weights_only=True and TorchScript archives are read for their tensors (torchscript_reader.py).
"""

from __future__ import annotations

import json
import os
import tempfile
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge import paths
from clipforge.model import config_json, convert
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.model.convert import CheckpointError
from clipforge.model.registry import get_config
from clipforge.tokenizer import AnyTokenizer, get_tokenizer
from clipforge.torchscript_reader import is_torchscript, read_torchscript
from clipforge.transforms import Preprocess, from_hf_preprocessor_config, to_hf_preprocessor_config

FORMAT_FILE = "clipforge.json"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
# ResNet towers' weights, in OpenAI's layout: under a name transformers does not look for, so that it refuses
# the directory rather than filling a default ViT with random weights.
OPENAI_WEIGHTS_FILE = "openai_model.safetensors"


@dataclass
class Loaded:
    """A checkpoint read from disk, before a model is built from it."""

    config: CLIPConfig
    state_dict: convert.StateDict  # clipforge names
    tokenizer: AnyTokenizer | None
    source: str  # what was read, for messages: "OpenAI TorchScript archive /x/ViT-B-32.pt"


# --- writing -------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    from clipforge import __version__

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


# --- reading -------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a .safetensors / .pt / .bin / .pth file, without running pickled or TorchScript code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        try:
            sd, source = load_file(path), f"safetensors file {path}"
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    elif is_torchscript(path):
        sd, source = read_torchscript(path), f"TorchScript archive {path}"
    else:
        sd, source = _read_pickled_state_dict(path), f"state dict {path}"
    _refuse_inflating_views(sd, path)
    return sd, source


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


def _refuse_non_finite(loaded: Loaded) -> None:
    """NaN or infinite weights make every embedding NaN; say which tensors hold them instead."""
    bad = [k for k, v in loaded.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointError(f"{loaded.source}: {len(bad)} tensor(s) hold NaN or infinite values: {shown}")


def _read_tokenizer(directory: Path, context_length: int) -> AnyTokenizer | None:
    if (directory / "tokenizer.json").exists() or (directory / "vocab.json").exists():
        return get_tokenizer(directory, context_length=context_length)
    return None


def _read_json(path: Path) -> dict[str, Any]:
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


def _read_clipforge_dir(d: Path) -> Loaded:
    file = d / FORMAT_FILE
    meta = _read_json(file)
    try:
        fmt, version = meta.get("format"), config_json.get(meta, "format_version", int, "", 0)
        if fmt != "clipforge" or version > FORMAT_VERSION:
            raise ValueError(
                f"unsupported format {fmt!r} v{version} (this clipforge reads v{FORMAT_VERSION})"
            )
        weights = config_json.get(meta, "weights", str, "", WEIGHTS_FILE)
        if Path(weights).name != weights or weights in ("", ".", ".."):
            raise ValueError(f"weights must name a file in the directory, found {weights!r}")
        layout = config_json.get(meta, "layout", typing.Literal["hf", "openai", "clipforge"], "", "openai")
        config_json.check_fields(CLIPConfig, config_json.get(meta, "config", dict, ""), "config")
        cfg = CLIPConfig.from_dict(meta["config"])
    except (ValueError, TypeError, ArithmeticError) as e:  # the dataclasses' own checks raise these too
        raise CheckpointError(f"{file}: {e}") from None
    sd, _ = read_state_dict(d / weights)
    if layout != "clipforge":
        sd = convert.from_hf(sd) if layout == "hf" else convert.from_openai(sd)
    return Loaded(cfg, sd, _read_tokenizer(d, cfg.text.context_length), f"clipforge checkpoint {d}")


def _read_hf_dir(d: Path) -> Loaded:
    hf = _read_json(d / "config.json")
    pre = None
    if (d / "preprocessor_config.json").exists():
        try:
            pre = from_hf_preprocessor_config(_read_json(d / "preprocessor_config.json"))
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{d / 'preprocessor_config.json'}: {e}") from None
    try:
        cfg = convert.config_from_hf(hf, pre)
    except (ValueError, TypeError, ArithmeticError) as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    weights = [d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: Hugging Face directory without model.safetensors or pytorch_model.bin")
    sd, _ = read_state_dict(weights[0])
    return Loaded(
        cfg, convert.from_hf(sd), _read_tokenizer(d, cfg.text.context_length), f"Hugging Face directory {d}"
    )


def _read_open_clip_dir(d: Path, activation: str | None) -> Loaded:
    file = d / "open_clip_config.json"
    meta = _read_json(file)
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    weights = [d / n for n in names if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: OpenCLIP directory without {' or '.join(names)}")
    sd, _ = read_state_dict(weights[0])
    sd = convert.from_openai(sd)
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
    return Loaded(cfg, sd, _read_tokenizer(d, cfg.text.context_length), f"OpenCLIP directory {d}")


def read_checkpoint(path: str | Path, *, preset: str | None = None, activation: str | None = None) -> Loaded:
    """Read any supported checkpoint into clipforge names and a config.

    `preset` names the architecture of a bare state dict (else it is inferred from shapes); `activation`
    overrides the activation where the file does not record it. Weights holding NaN or infinities are refused."""
    p = Path(path).expanduser()
    loaded = _read_directory(p, activation) if p.is_dir() else _read_file(p, preset, activation)
    _refuse_non_finite(loaded)
    return loaded


def _read_directory(p: Path, activation: str | None) -> Loaded:
    readers = [
        (FORMAT_FILE, _read_clipforge_dir),
        ("open_clip_config.json", lambda d: _read_open_clip_dir(d, activation)),
        ("config.json", _read_hf_dir),
    ]
    for name, reader in readers:
        if (p / name).exists():
            return reader(p)
    raise CheckpointError(
        f"{p}: not a model directory (no {FORMAT_FILE}, config.json or open_clip_config.json in it)"
    )


def _read_file(p: Path, preset: str | None, activation: str | None) -> Loaded:
    raw, source = read_state_dict(p)
    layout = convert.detect_layout(raw)
    if layout == "hf":
        raise CheckpointError(f"{p}: Hugging Face weights need their directory (config.json beside them)")
    sd = raw if layout == "clipforge" else convert.from_openai(raw)
    is_openai = "TorchScript" in source or "input_resolution" in raw
    if preset is not None:
        cfg = get_config(preset)
        if activation is not None:
            cfg = cfg.replace(activation=activation)
    else:
        cfg = convert.infer_config(sd, activation=activation, source="openai" if is_openai else "state dict")
    return Loaded(cfg, sd, None, source)


def build_model(loaded: Loaded) -> CLIP:
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated before the weights are checked
            model = CLIP(loaded.config)
    except (RuntimeError, ValueError, ArithmeticError) as e:  # zero or absurd sizes
        raise CheckpointError(
            f"{loaded.source}: its config describes a model that cannot be built ({e})"
        ) from None
    convert.check_state_dict(model, loaded.state_dict, loaded.source)
    # Weights arrive in any dtype (OpenAI's are fp16); the model keeps fp32 master weights.
    model.load_state_dict(
        {k: v.float().contiguous() for k, v in loaded.state_dict.items()}, strict=False, assign=True
    )
    for name, buf in model.named_buffers():  # buffers not in the file (BatchNorm's step counters)
        if buf.is_meta:
            module, _, attr = name.rpartition(".")
            model.get_submodule(module).register_buffer(attr, torch.zeros((), dtype=torch.long))
    return model.eval()


# Names of the models clipforge installs in its cache, and the command that makes each.
NAMED_MODELS = {
    "default": (paths.default_model_dir, "run `make demo` (trains it on the open corpus)"),
    "default-multilingual": (
        paths.multilingual_model_dir,
        "run `clipforge train-multilingual --teacher MODEL` (distils it from a default model)",
    ),
}


def resolve(path: str | Path) -> Path:
    """'default' and 'default-multilingual' name the models in the cache; anything else is a local path."""
    if str(path) in NAMED_MODELS:
        where, how = NAMED_MODELS[str(path)]
        d = where()
        if not (d / FORMAT_FILE).exists():
            raise FileNotFoundError(f"no {path} model at {d} yet: {how} or pass a model path")
        return d
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"model not found: {p} (clipforge reads local files only; nothing is downloaded)"
        )
    return p


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


def load(
    path: str | Path,
    *,
    vocab: str | Path | None = None,
    device: str | torch.device = "cpu",
    preset: str | None = None,
    activation: str | None = None,
    precision: str = "fp32",
    compile: bool = False,
    channels_last: bool | None = None,
) -> tuple[CLIP, Preprocess, AnyTokenizer | None]:
    """`model, preprocess, tokenizer = clipforge.load(path)`: any supported checkpoint, ready for inference.

    `vocab` (a vocabulary file or directory) supplies the tokenizer of a bare state dict, which carries none.
    `precision` ("fp32", "bf16", "int8"), `compile` and `channels_last` pick inference fast paths (see
    clipforge.fast.optimize and docs/speed.md). A directory written by `clipforge export onnx` loads as a model
    run by onnxruntime with the same encode_image / encode_text API."""
    p = resolve(path)
    from clipforge.onnx_export import is_onnx_dir, load_onnx

    if is_onnx_dir(p):
        if precision != "fp32" or compile or channels_last:
            raise ValueError(
                f"{p} is an ONNX export: precision, compile and channels_last apply to PyTorch models"
            )
        return load_onnx(p, vocab=vocab)
    loaded = read_checkpoint(p, preset=preset, activation=activation)
    model = build_model(loaded).to(device)
    if precision != "fp32" or compile or channels_last is not False:
        from clipforge.fast import optimize

        model = optimize(model, precision=precision, compile=compile, channels_last=channels_last)
    tokenizer = choose_tokenizer(loaded.tokenizer, vocab, loaded.config, loaded.source)
    return model, Preprocess(loaded.config.preprocess), tokenizer
