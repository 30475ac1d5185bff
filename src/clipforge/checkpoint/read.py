"""`load()`: find the reader whose layout a path has, read it, check it, build the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from clipforge import paths
from clipforge.checkpoint import clipforge_dir, hf_dir, open_clip_dir, state_dict_file
from clipforge.checkpoint.common import (
    FORMAT_FILE,
    Loaded,
    ReadOptions,
    choose_tokenizer,
    refuse_non_finite,
)
from clipforge.model import convert
from clipforge.model.clip import CLIP
from clipforge.model.convert import CheckpointError
from clipforge.model.resize import with_image_size
from clipforge.model.tower import Towers, check_towers
from clipforge.tokenizer import AnyTokenizer
from clipforge.transforms import Preprocess

# Probed in order: a directory may hold several configs (a clipforge directory also has HF's config.json).
READERS = (clipforge_dir, open_clip_dir, hf_dir, state_dict_file)


def read_checkpoint(
    path: str | Path,
    *,
    preset: str | None = None,
    activation: str | None = None,
    towers: Towers = "both",
    image_size: int | None = None,
) -> Loaded:
    """Read any supported checkpoint into clipforge names and a config.

    `preset` names the architecture of a bare state dict (else it is inferred from shapes); `activation`
    overrides the activation where the file does not record it; `towers` ("text" or "image") keeps that tower's
    tensors only (a safetensors file reads no others); `image_size` resizes the image tower's position
    embeddings (and the preprocessing) for inputs of that size. Weights holding NaN or infinities are refused."""
    check_towers(towers)
    keep = None if towers == "both" else (lambda key: convert.tower_of(key) in (towers, "shared"))
    loaded = _read(Path(path).expanduser(), ReadOptions(preset=preset, activation=activation, keep=keep))
    if image_size is not None:
        cfg, sd = with_image_size(loaded.config, loaded.state_dict, image_size)
        loaded = dataclasses.replace(loaded, config=cfg, state_dict=sd)
    return loaded


def _read(p: Path, options: ReadOptions) -> Loaded:
    reader = next((r for r in READERS if r.probe(p)), None)
    if reader is None:
        raise CheckpointError(
            f"{p}: not a model directory (no {FORMAT_FILE}, config.json or {open_clip_dir.CONFIG_FILE} in it)"
        )
    loaded = reader.read(p, options)
    refuse_non_finite(loaded)
    return loaded


def build_model(loaded: Loaded, towers: Towers = "both") -> CLIP:
    """The model `loaded` describes, with `towers` built (the other, if any, is an AbsentTower); every tensor of
    the towers built must be in `loaded`, and no other."""
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated before the weights are checked
            model = CLIP(loaded.config, towers=towers)
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
    towers: Towers = "both",
    image_size: int | None = None,
) -> tuple[CLIP, Preprocess, AnyTokenizer | None]:
    """`model, preprocess, tokenizer = clipforge.load(path)`: any supported checkpoint, ready for inference.

    `vocab` (a vocabulary file or directory) supplies the tokenizer of a bare state dict, which carries none.
    `precision` ("fp32", "bf16", "int8"), `compile` and `channels_last` pick inference fast paths (see
    clipforge.fast.optimize and docs/speed.md). A directory written by `clipforge export onnx` loads as a model
    run by onnxruntime with the same encode_image / encode_text API.

    `towers="text"` (or "image") reads, builds and keeps that tower alone: a text-query service holds no image
    weights. The missing tower's encode_* raises TowerNotLoadedError. `image_size` runs the image tower at another
    input size than it was trained at (ViT and ResNet position embeddings interpolated bicubically); the
    returned preprocessing makes images of that size."""
    check_towers(towers)
    p = resolve(path)
    from clipforge.onnx_export import is_onnx_dir, load_onnx

    if is_onnx_dir(p):
        if precision != "fp32" or compile or channels_last or image_size is not None:
            raise ValueError(
                f"{p} is an ONNX export: precision, compile, channels_last and image_size apply to PyTorch models"
            )
        return load_onnx(p, vocab=vocab, towers=towers)
    loaded = read_checkpoint(p, preset=preset, activation=activation, towers=towers, image_size=image_size)
    model = build_model(loaded, towers).to(device)
    if precision != "fp32" or compile or channels_last is not False:
        from clipforge.fast import optimize

        model = optimize(model, precision=precision, compile=compile, channels_last=channels_last)
    tokenizer = choose_tokenizer(loaded.tokenizer, vocab, loaded.config, loaded.source)
    return model, Preprocess(loaded.config.preprocess), tokenizer
