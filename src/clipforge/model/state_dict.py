"""What every converter shares: the state dict type, the error a checkpoint that does not fit raises, and
the checks run on any layout (which layout a state dict is in, the training wrappers around it, whether it fits
a model). Imports no converter, so each can import it."""

from __future__ import annotations

from typing import Any

import torch

StateDict = dict[str, torch.Tensor]

# OpenAI's top-level names of text-tower parts.
OPENAI_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_IMAGE_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_TEXT_PREFIXES = ("text.", "text_model.", "text_projection", *OPENAI_TEXT)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every missing, unexpected and mis-shaped tensor."""


def detect_layout(sd: StateDict) -> str:
    """'hf', 'clipforge' or 'openai' (OpenAI and OpenCLIP share one layout)."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        return "hf"
    if any(k.startswith("text.") for k in sd) and "text_projection" not in sd:
        return "clipforge"
    if any(k.startswith("visual.") for k in sd) or "token_embedding.weight" in sd:
        return "openai"
    raise CheckpointError(
        "not a CLIP state dict: found none of the OpenAI/OpenCLIP ('visual.', 'token_embedding.weight'), "
        f"Hugging Face ('text_model.', 'vision_model.') or clipforge ('text.') names; first keys: {list(sd)[:5]}"
    )


def tower_of(key: str) -> str:
    """'image', 'text' or 'shared' (logit_scale, logit_bias) for a tensor name in any layout detect_layout
    knows: their tower prefixes do not collide, so one rule reads them all."""
    if key.startswith(_IMAGE_PREFIXES):
        return "image"
    if key.startswith(_TEXT_PREFIXES):
        return "text"
    return "shared"


def unwrap(sd: dict[str, Any]) -> StateDict:
    """Training checkpoints nest the weights ({'state_dict': ...}) and DDP prefixes them ('module.')."""
    for key in ("state_dict", "model", "model_state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def fuse_qkv(qkv: dict[str, dict[str, torch.Tensor]], source: str) -> StateDict:
    """{fused name: {"q": .., "k": .., "v": ..}} -> {fused name: q, k and v stacked}, as our Attention holds them."""
    out = {}
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{key}: {source} checkpoint lacks some of q/k/v (has {sorted(parts)})")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def check_state_dict(model: torch.nn.Module, sd: StateDict, source: str, fresh: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError listing every missing, unexpected or mis-shaped tensor; never a partial load.
    `fresh` names the tensors the checkpoint is not meant to hold (a new projection on a pretrained tower)."""
    expected = model.state_dict()
    buffers_ok = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(sd) - buffers_ok - set(fresh))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{len(items)} {title}: " + ", ".join(shown))
        raise CheckpointError("; ".join(parts))
