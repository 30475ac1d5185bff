"""Reading and writing models on disk.

clipforge's own format is a directory that Hugging Face transformers also loads (config.json,
model.safetensors, tokenizer files, preprocessor_config.json) plus `clipforge.json`, which records the full
config (activation and preprocessing included) and the weights' layout:

- ViT image towers: weights in Hugging Face's CLIPModel names, so `CLIPModel.from_pretrained(dir)` works.
- ResNet image towers (which transformers lacks): weights in OpenAI's layout, which OpenAI's `build_model` and
  OpenCLIP read; no config.json is written, so transformers refuses the directory instead of misreading it.
- Pretrained-tower kinds (EfficientNet-Lite, BERT): weights in clipforge's own names, no config.json either; the
  tokenizer is the tokenizer.json the text tower reads (WordPiece for BERT).

Foreign inputs: OpenAI `.pt` (state dicts and TorchScript archives), OpenCLIP state dicts (.pt/.bin/.safetensors,
or a directory with open_clip_config.json) and Hugging Face directories. Nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from clipforge import paths
from clipforge.model import convert
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.model.convert import CheckpointError
from clipforge.model.registry import get_config
from clipforge.tokenizer import AnyTokenizer, get_tokenizer
from clipforge.transforms import Preprocess, from_hf_preprocessor_config, to_hf_preprocessor_config

FORMAT_FILE = "clipforge.json"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


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
    _atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
    if layout == "hf":
        _write_json(out / "config.json", convert.hf_config(cfg))
    _write_json(out / "preprocessor_config.json", to_hf_preprocessor_config(cfg.preprocess))
    if tokenizer is not None:
        tokenizer.save(out)
    meta = {
        "format": "clipforge",
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "weights": WEIGHTS_FILE,
        "layout": layout,
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    _write_json(out / FORMAT_FILE, meta)  # written last: a directory without it is not a finished checkpoint
    return out


# --- reading -------------------------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("constants.pkl") for n in z.namelist())


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a .safetensors / .pt / .bin / .pth file, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path), f"safetensors file {path}"
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if _is_torchscript(path):
        # TorchScript archives hold TorchScript code and tensors in their own format; loading compiles the code
        # but runs none of it and unpickles no Python objects. Only the tensors are kept.
        module = torch.jit.load(str(path), map_location="cpu")
        return dict(module.state_dict()), f"TorchScript archive {path}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: refusing to load. It is not a plain tensor state dict that loads with weights_only=True, "
            f"and unpickling arbitrary objects could run code ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Re-save its state_dict() with a tool you trust, or convert it to safetensors."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    return convert.unwrap(obj), f"state dict {path}"


def _read_tokenizer(directory: Path, context_length: int) -> AnyTokenizer | None:
    if (directory / "tokenizer.json").exists() or (directory / "vocab.json").exists():
        return get_tokenizer(directory, context_length=context_length)
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_clipforge_dir(d: Path) -> Loaded:
    meta = _read_json(d / FORMAT_FILE)
    if meta.get("format") != "clipforge" or meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{d / FORMAT_FILE}: unsupported format {meta.get('format')!r} v{meta.get('format_version')}"
        )
    cfg = CLIPConfig.from_dict(meta["config"])
    sd, _ = read_state_dict(d / meta.get("weights", WEIGHTS_FILE))
    layout = meta.get("layout")
    if layout != "clipforge":
        sd = convert.from_hf(sd) if layout == "hf" else convert.from_openai(sd)
    return Loaded(cfg, sd, _read_tokenizer(d, cfg.text.context_length), f"clipforge checkpoint {d}")


def _read_hf_dir(d: Path) -> Loaded:
    hf = _read_json(d / "config.json")
    pre = None
    if (d / "preprocessor_config.json").exists():
        pre = from_hf_preprocessor_config(_read_json(d / "preprocessor_config.json"))
    cfg = convert.config_from_hf(hf, pre)
    weights = [d / n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: Hugging Face directory without model.safetensors or pytorch_model.bin")
    sd, _ = read_state_dict(weights[0])
    return Loaded(
        cfg, convert.from_hf(sd), _read_tokenizer(d, cfg.text.context_length), f"Hugging Face directory {d}"
    )


def _read_open_clip_dir(d: Path, activation: str | None) -> Loaded:
    meta = _read_json(d / "open_clip_config.json")
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    weights = [d / n for n in names if (d / n).exists()]
    if not weights:
        raise CheckpointError(f"{d}: OpenCLIP directory without {' or '.join(names)}")
    sd, _ = read_state_dict(weights[0])
    sd = convert.from_openai(sd)
    if activation is None:
        activation = "quick_gelu" if meta.get("model_cfg", {}).get("quick_gelu") else "gelu"
    cfg = convert.infer_config(sd, activation=activation)
    p = meta.get("preprocess_cfg", {})
    pre = PreprocessConfig(
        image_size=cfg.vision.image_size,
        mean=tuple(p.get("mean", cfg.preprocess.mean)),
        std=tuple(p.get("std", cfg.preprocess.std)),
        interpolation=p.get("interpolation", "bicubic"),
        resize_mode={"squash": "squash"}.get(p.get("resize_mode", "shortest"), "shortest"),
    )
    cfg = cfg.replace(preprocess=pre)
    return Loaded(cfg, sd, _read_tokenizer(d, cfg.text.context_length), f"OpenCLIP directory {d}")


def read_checkpoint(path: str | Path, *, preset: str | None = None, activation: str | None = None) -> Loaded:
    """Read any supported checkpoint into clipforge names and a config.

    `preset` names the architecture of a bare state dict (else it is inferred from shapes); `activation`
    overrides the activation where the file does not record it."""
    p = Path(path).expanduser()
    if p.is_dir():
        readers = [
            (FORMAT_FILE, _read_clipforge_dir),
            ("open_clip_config.json", lambda d: _read_open_clip_dir(d, activation)),
            ("config.json", _read_hf_dir),
        ]
        for name, reader in readers:
            if (p / name).exists():
                try:
                    return reader(p)
                except (KeyError, TypeError) as e:  # a config file missing a field or holding a wrong type
                    raise CheckpointError(
                        f"{p / name}: malformed model config ({type(e).__name__}: {e})"
                    ) from None
        raise CheckpointError(
            f"{p}: not a model directory (no {FORMAT_FILE}, config.json or open_clip_config.json in it)"
        )
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
    with torch.device("meta"):
        model = CLIP(loaded.config)
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


def resolve(path: str | Path) -> Path:
    """'default' names the default model in the cache; anything else is a local path."""
    if str(path) == "default":
        d = paths.default_model_dir()
        if not (d / FORMAT_FILE).exists():
            raise FileNotFoundError(
                f"no default model at {d} yet: run `make demo` (trains it on the open corpus) or pass a model path"
            )
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
