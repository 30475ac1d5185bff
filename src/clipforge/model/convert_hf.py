"""Hugging Face transformers' CLIPModel: its tensor names and config.json, both ways (ViT image towers only)."""

from __future__ import annotations

import re
from typing import Any

import torch

from clipforge.model import config_json
from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.model.state_dict import CheckpointError, StateDict, fuse_qkv

_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_FIXED = {
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
_HF_TOWER = {"text_model": "text", "vision_model": "visual"}
_HF_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def from_hf(sd: StateDict) -> StateDict:
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in _HF_FIXED:
            out[_HF_FIXED[k]] = v
        elif k == "text_projection.weight":
            out["text.text_projection"] = v.t()  # HF stores (embed, width) Linear weights; we multiply x @ W
        elif k == "visual_projection.weight":
            out["visual.proj"] = v.t()
        elif m := _HF_LAYER.match(k):
            tower, i, name, kind = m.groups()
            prefix = f"{_HF_TOWER[tower]}.transformer.resblocks.{i}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{kind}", {})[name[-6]] = v
            elif name in _HF_BLOCK:
                out[f"{prefix}{_HF_BLOCK[name]}.{kind}"] = v
            else:
                out[k] = v  # reported as unexpected by check_state_dict
        else:
            out[k] = v
    return out | fuse_qkv(qkv, "Hugging Face")


def to_hf(sd: StateDict) -> StateDict:
    inverse_fixed = {v: k for k, v in _HF_FIXED.items()}
    inverse_block = {v: k for k, v in _HF_BLOCK.items()}
    inverse_tower = {v: k for k, v in _HF_TOWER.items()}
    layer = re.compile(r"^(text|visual)\.transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)$")
    out: StateDict = {}
    for k, v in sd.items():
        if k in inverse_fixed:
            out[inverse_fixed[k]] = v
        elif k == "text.text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif m := layer.match(k):
            tower, i, name, kind = m.groups()
            prefix = f"{inverse_tower[tower]}.encoder.layers.{i}."
            if name == "attn.in_proj":
                for part, chunk in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
            else:
                out[f"{prefix}{inverse_block[name]}.{kind}"] = v
        else:
            raise CheckpointError(f"{k}: no Hugging Face CLIPModel equivalent (ResNet towers have none)")
    return out


def hf_config(cfg: CLIPConfig) -> dict[str, Any]:
    """config.json contents for transformers' CLIPModel (ViT image towers only)."""
    if cfg.vision.kind != "vit":
        raise CheckpointError("Hugging Face's CLIPModel has no ResNet image tower; save in the OpenAI layout")
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "torch_dtype": "float32",
        "text_config": {
            "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "max_position_embeddings": t.context_length,
            "vocab_size": t.vocab_size,
            "hidden_act": cfg.activation,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
            "bos_token_id": t.sot_token_id,
            # HF pools at the first eos_token_id (any id but the legacy 2), as clipforge does.
            "eos_token_id": t.eot_token_id,
            "pad_token_id": t.pad_token_id,
        },
        "vision_config": {
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_attention_heads": v.heads,
            "num_hidden_layers": v.layers,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": cfg.activation,
            "layer_norm_eps": 1e-5,
            "projection_dim": cfg.embed_dim,
        },
    }


def config_from_hf(d: dict[str, Any], preprocess: PreprocessConfig | None = None) -> CLIPConfig:
    """The CLIPConfig of a transformers config.json; ValueError names any field that is missing or mistyped."""
    if d.get("model_type") not in ("clip", None):
        raise CheckpointError(f"config.json has model_type {d.get('model_type')!r}, expected 'clip'")
    t = config_json.get(d, "text_config", dict, "")
    v = config_json.get(d, "vision_config", dict, "")
    dim = _positive_int
    acts = {
        config_json.get(t, "hidden_act", str, "text_config", "quick_gelu"),
        config_json.get(v, "hidden_act", str, "vision_config", "quick_gelu"),
    }
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(
            f"unsupported activation(s) {sorted(acts)}; clipforge runs 'quick_gelu' or 'gelu'"
        )
    vocab = dim(t, "vocab_size", "text_config", 49408)
    sot, eot, pad = (
        config_json.get(t, "bos_token_id", int, "text_config", vocab - 2),
        config_json.get(t, "eos_token_id", int, "text_config", vocab - 1),
        config_json.get(t, "pad_token_id", int | None, "text_config", 0),
    )
    if (
        eot == 2
    ):  # transformers' legacy configs (bos 0, eos 2, pad 1): pooling was argmax, i.e. the largest id
        sot, eot, pad = vocab - 2, vocab - 1, 0
    v_width, t_width = dim(v, "hidden_size", "vision_config"), dim(t, "hidden_size", "text_config")
    vision = VisionConfig(
        kind="vit",
        image_size=dim(v, "image_size", "vision_config"),
        patch_size=dim(v, "patch_size", "vision_config"),
        width=v_width,
        layers=dim(v, "num_hidden_layers", "vision_config"),
        heads=dim(v, "num_attention_heads", "vision_config"),
        mlp_ratio=dim(v, "intermediate_size", "vision_config", 4 * v_width) / v_width,
    )
    text = TextConfig(
        context_length=dim(t, "max_position_embeddings", "text_config", 77),
        vocab_size=vocab,
        width=t_width,
        heads=dim(t, "num_attention_heads", "text_config"),
        layers=dim(t, "num_hidden_layers", "text_config"),
        mlp_ratio=dim(t, "intermediate_size", "text_config", 4 * t_width) / t_width,
        sot_token_id=sot,
        eot_token_id=eot,
        pad_token_id=0 if pad is None else pad,
    )
    pre = preprocess or PreprocessConfig(image_size=vision.image_size)
    return CLIPConfig(
        embed_dim=dim(d, "projection_dim", "", 512),
        vision=vision,
        text=text,
        activation=acts.pop(),
        logit_scale_init=config_json.get(d, "logit_scale_init_value", float, "", 2.6592),
        preprocess=pre,
    )


def _positive_int(c: dict[str, Any], key: str, where: str, *default: int) -> int:
    n = config_json.get(c, key, int, where, *default)
    if n < 1:
        raise ValueError(f"{f'{where}.' if where else ''}{key} must be a positive integer, found {n}")
    return n
