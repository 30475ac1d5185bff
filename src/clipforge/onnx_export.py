"""Export a CLIP model's towers to ONNX, and run an exported directory through onnxruntime.

An export directory holds image.onnx (images (B, 3, S, S) -> features (B, D)), text.onnx (tokens (B, T) ->
features (B, D), batch and sequence length dynamic), the tokenizer files, preprocessor_config.json and a
clipforge.json with {"format": "clipforge-onnx", "config": ...}. `clipforge.load(dir)` returns an `OnnxCLIP`,
which trims each text batch to its longest caption on the host exactly as the PyTorch text tower does.

onnx, onnxscript (export) and onnxruntime (run) are optional dependencies, imported where used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.clip import CLIP, MAX_LOGIT_SCALE
from clipforge.model.config import CLIPConfig
from clipforge.model.convert import CheckpointError
from clipforge.model.text import eot_positions
from clipforge.model.tower import Towers, not_loaded
from clipforge.tokenizer import Tokenizer
from clipforge.transforms import Preprocess, to_hf_preprocessor_config

ONNX_FORMAT = "clipforge-onnx"
FORMAT_VERSION = 1
META_FILE = "clipforge.json"
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
OPSET = 18


class _ImageTower(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        return self.model.encode_image(images)


class _TextTower(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, D)
        return self.model.encode_text(tokens)


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic: dict, name: str) -> None:
    from torch.export import Dim

    try:
        import onnxscript  # noqa: F401  (the exporter needs it; fail here with a clear message)
    except ImportError as e:
        raise ImportError("ONNX export needs `pip install onnx onnxscript`") from e
    shapes = {"x": {axis: Dim(label, min=lo, max=hi) for axis, (label, lo, hi) in dynamic.items()}}
    wrapper = _Named(module)
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_500_000_000
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)  # the exporter logs a line per torchvision op it skips
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=[name],
                output_names=["features"],
                opset_version=OPSET,
                external_data=big,  # protobuf files stop at 2 GB
                verbose=False,
            )
    finally:
        log.setLevel(level)


class _Named(nn.Module):
    """Gives the exported input one argument name, `x`, for dynamic_shapes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def export_onnx(model: CLIP, out_dir: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model`'s towers as ONNX graphs (dynamic batch; dynamic text length) plus what `load` needs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    # Export a CPU fp32 copy: the caller's model keeps its device, dtype, mode and trimming.
    model = copy.deepcopy(model).float().eval().cpu()
    model.text.trim = False  # no host-side slicing inside the graph; OnnxCLIP trims before running it
    size = cfg.vision.image_size
    images = torch.zeros(2, 3, size, size)
    _export(_ImageTower(model), images, out / IMAGE_FILE, {0: ("batch", 1, 4096)}, "images")
    ctx = cfg.text.context_length
    tokens = torch.zeros(2, ctx, dtype=torch.long)
    tokens[:, -1] = cfg.text.eot_token_id
    dyn = {0: ("batch", 1, 65536), 1: ("length", 2, ctx)}
    _export(_TextTower(model), tokens, out / TEXT_FILE, dyn, "tokens")
    (out / "preprocessor_config.json").write_text(json.dumps(to_hf_preprocessor_config(cfg.preprocess)))
    if tokenizer is not None:
        tokenizer.save(out)
    meta = {
        "format": ONNX_FORMAT,
        "format_version": FORMAT_VERSION,
        "image": IMAGE_FILE,
        "text": TEXT_FILE,
        "config": cfg.to_dict(),
        "logit_scale": float(model.logit_scale.detach()),
        "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks the export finished
    return out


def is_onnx_dir(path: str | Path) -> bool:
    meta = Path(path) / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == ONNX_FORMAT
    except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object: the checkpoint reader names it
        return False


class OnnxCLIP:
    """encode_image / encode_text over onnxruntime sessions; torch tensors in and out, like `CLIP`."""

    def __init__(self, directory: str | Path, threads: int | None = None, towers: Towers = "both"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("running an ONNX export needs `pip install onnxruntime`") from e
        d = Path(directory)
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{d / META_FILE}: format version {meta['format_version']} is newer than this"
            )
        self.config = CLIPConfig.from_dict(meta["config"])
        self.directory = d
        self._logit_scale = float(meta["logit_scale"])
        self._logit_bias = meta.get("logit_bias")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.towers = towers
        self.image_session, self.text_session = (
            ort.InferenceSession(str(d / meta[k]), opts, providers=["CPUExecutionProvider"])
            if towers in ("both", k)
            else None
            for k in ("image", "text")
        )

    device = torch.device("cpu")

    def keep_towers(self, towers: Towers) -> OnnxCLIP:
        """Close the session of the tower `towers` leaves out (as CLIP.keep_towers)."""
        if towers == "text":
            self.image_session = None
        elif towers == "image":
            self.text_session = None
        return self

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def fingerprint(self) -> str:
        """sha256 over the config and both graphs (an export's vectors differ from its source's by ~1e-6)."""
        h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name in (IMAGE_FILE, TEXT_FILE):
            h.update((self.directory / name).read_bytes())
        return "sha256:" + h.hexdigest()

    def eval(self) -> OnnxCLIP:
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.image_session is None:
            raise not_loaded("image")
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (f,) = self.image_session.run(None, {"images": x})
        f = torch.from_numpy(f)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if self.text_session is None:
            raise not_loaded("text")
        t = self.config.text
        if tokens.shape[1] > t.context_length:
            raise ValueError(
                f"text has {tokens.shape[1]} tokens; this model's context length is {t.context_length}"
            )
        # Trim to the longest text, as TextTransformer does: causal attention makes it exact.
        tokens = tokens[:, : max(int(eot_positions(tokens, t.eot_token_id).max()) + 1, 2)]
        (f,) = self.text_session.run(None, {"tokens": tokens.to("cpu", torch.long).contiguous().numpy()})
        f = torch.from_numpy(np.asarray(f))
        return F.normalize(f, dim=-1) if normalize else f

    def scale(self) -> torch.Tensor:
        return torch.tensor(min(float(np.exp(self._logit_scale)), MAX_LOGIT_SCALE))

    def logits(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        per_image = self.scale() * img @ txt.t()
        if self._logit_bias is not None:
            per_image = per_image + self._logit_bias
        return per_image, per_image.t()


def load_onnx(
    directory: str | Path, vocab: str | Path | None = None, towers: Towers = "both"
) -> tuple[OnnxCLIP, Preprocess, Tokenizer | None]:
    from clipforge.checkpoint.common import choose_tokenizer, read_tokenizer

    model = OnnxCLIP(directory, towers=towers)
    found = read_tokenizer(Path(directory), model.config.text.context_length)
    tokenizer = choose_tokenizer(found, vocab, model.config, f"ONNX export {directory}")
    return model, Preprocess(model.config.preprocess), tokenizer
