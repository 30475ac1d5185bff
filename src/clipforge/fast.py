"""Inference fast paths applied to a loaded CLIP model: int8 linears, bf16 autocast, channels-last, torch.compile.

`optimize(model, precision=..., compile=..., channels_last=...)` returns the optimised model: the same object,
changed in place, except for "bf16", which returns an `AutocastCLIP` sharing the model's modules. The
`encode_image` / `encode_text` API and the fp32 state-dict names of everything that is not quantised stay as
they were. What each option costs in accuracy and buys in speed is measured by bench/encode.py (docs/speed.md).

- "int8": every nn.Linear of both towers (and the fused q/k/v projection, held as a raw Parameter in
  `Attention`) becomes `Int8Linear`: weights quantised once per output channel, activations quantised per token
  at run time, an int8 x int8 -> int32 matrix product (`torch._int_mm`, VNNI on x86), rescaled to fp32. This
  replaces torch.ao.quantization.quantize_dynamic, deprecated in torch 2.x, and is faster than its fbgemm
  kernel here. Convolutions (the ViT patch embedding, the ResNet body) stay fp32.
- "bf16": `AutocastCLIP`, a CLIP subclass whose encode_image / encode_text run the towers under autocast
  (bf16 matmuls, fp32 master weights); features come back as fp32. Nothing is patched onto a module, so the
  towers are plain modules still, and the model passed in keeps its fp32 behaviour. Pays on GPUs and on CPUs
  with AVX-512 BF16 / AMX; elsewhere it is emulated and slow.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.clip import CLIP
from clipforge.model.layers import Attention

InferencePrecision = Literal["fp32", "bf16", "int8"]
# Inference only: training precisions (train.config) are another set, with fp16 autocast and no int8.
INFERENCE_PRECISIONS = ("fp32", "bf16", "int8")


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x int8 per token (symmetric, scales from |max|)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight_int8", q.t().contiguous().t())  # (out, in) with column-major storage
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, in)
        s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (M, 1) per-token scale
        xq = torch.round(x2 / s).clamp_(-127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight_int8.t()).float()  # (M, out) int32 accumulations
        y = y.mul_(s).mul_(self.weight_scale)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Attention(nn.Module):
    """`Attention` with its fused q/k/v and output projections as `Int8Linear`; same computation otherwise."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.heads = attn.heads
        self.in_proj = Int8Linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out_proj = Int8Linear.from_linear(attn.out_proj)

    def forward(
        self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.in_proj(x)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replace, in place, every `Attention` and `nn.Linear` below `module` by its int8 form."""
    for name, child in list(module.named_children()):
        if isinstance(child, Attention):
            setattr(module, name, Int8Attention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return module


class AutocastCLIP(CLIP):
    """A CLIP whose towers run under `torch.autocast(device_type, dtype)`, features returned as fp32.

    It holds the modules and parameters of the model it is made from (shared, not copied), under the same
    state-dict names, so checkpoints and fingerprints are those of the fp32 model."""

    def __init__(self, model: CLIP, device_type: str, dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)  # not CLIP.__init__: the towers exist already and are shared
        self.config = model.config
        self.visual, self.text, self.towers = model.visual, model.text, model.towers
        self.logit_scale, self.logit_bias = model.logit_scale, model.logit_bias
        self.device_type, self.autocast_dtype = device_type, dtype
        self.train(model.training)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            f = super().encode_image(images).float()
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            f = super().encode_text(tokens).float()
        return F.normalize(f, dim=-1) if normalize else f


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX-512 BF16 or AMX (Linux flags)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def optimize(
    model: CLIP,
    *,
    precision: InferencePrecision = "fp32",
    compile: bool = False,
    channels_last: bool | None = None,
) -> CLIP:
    """Apply inference fast paths to `model` and return the model to use (in eval mode): `model` itself,
    changed in place, or for "bf16" an `AutocastCLIP` sharing its modules.

    precision: "fp32" (exact), "bf16" (autocast), "int8" (CPU only: int8 linears). compile: torch.compile each
    tower (the first call of each new input shape compiles, ~1 minute). channels_last: NHWC convolutions for
    ResNet towers; None chooses it for ResNet towers, where it was measured to pay (docs/speed.md)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(INFERENCE_PRECISIONS)}")
    model.eval()
    device = next(model.parameters()).device
    is_resnet = model.config.vision.kind != "vit"
    if channels_last is None:
        channels_last = is_resnet
    if channels_last and is_resnet:
        model.visual.to(memory_format=torch.channels_last)
        model.visual.register_forward_pre_hook(_to_channels_last)
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError(f"precision 'int8' runs on CPU only; the model is on {device} (use 'bf16')")
        model.requires_grad_(False)
        quantize_int8(model.visual)
        quantize_int8(model.text)
    elif precision == "bf16":
        model = AutocastCLIP(model, device.type, torch.bfloat16)
    if compile:
        # nn.Module.compile() compiles in place, so parameter names stay those of the checkpoint.
        model.visual.compile(dynamic=False)
        model.text.compile(dynamic=True)
    return model


# --- CUDA helpers (skipped on CPU) -----------------------------------------------------------------------------


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a host batch to `device`; for CUDA through pinned memory, asynchronously (overlaps the next decode)."""
    device = torch.device(device)
    if device.type != "cuda" or x.device.type == "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class CUDAGraphRunner:
    """Replays one CUDA graph of `fn` captured for a fixed (batch, ...) input shape; smaller batches are padded.

    Launch overhead dominates small batches on a GPU; a graph removes it. The text tower must run untrimmed
    (`model.text.trim = False`) so its shapes stay static."""

    def __init__(self, fn, example: torch.Tensor, warmup: int = 3):
        if example.device.type != "cuda":
            raise ValueError("CUDAGraphRunner needs a CUDA input; the example is on " + str(example.device))
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # warm-up outside the graph (allocator, cuBLAS handles)
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = fn(self.static_in)

    @property
    def batch_size(self) -> int:
        return self.static_in.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n > self.batch_size or x.shape[1:] != self.static_in.shape[1:]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit the captured shape {tuple(self.static_in.shape)}"
            )
        self.static_in[:n].copy_(x, non_blocking=True)
        if n < self.batch_size:
            self.static_in[n:].zero_()
        self.graph.replay()
        return self.static_out[:n].clone()
