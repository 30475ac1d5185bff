"""The only place that knows foreign tensor names: OpenAI's, OpenCLIP's and Hugging Face's, and those of the
pretrained towers (Hugging Face's BertModel as sentence-transformers ships it, EfficientNet-PyTorch).

clipforge's own names are OpenAI's inside each tower, with the text tower gathered under `text.` (OpenAI keeps
its parts at the top level). Each function here maps a whole state dict; shapes are never guessed except by
`infer_config`, used only for foreign checkpoints that carry no config.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch

from clipforge.model import config_json
from clipforge.model.config import BertTextConfig, CLIPConfig, PreprocessConfig, TextConfig, VisionConfig

StateDict = dict[str, torch.Tensor]

# OpenAI's top-level names of text-tower parts.
_OPENAI_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Entries that some OpenAI / OpenCLIP files carry but that are not weights.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


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


_IMAGE_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_TEXT_PREFIXES = ("text.", "text_model.", "text_projection", *_OPENAI_TEXT)


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


# --- OpenAI / OpenCLIP ---------------------------------------------------------------------------------------


def from_openai(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        if k in _NOT_WEIGHTS or k.endswith("attn_mask"):
            continue
        if k.startswith("text.text_projection.weight"):  # OpenCLIP's CustomTextCLIP keeps a Linear
            out["text.text_projection"] = v.t()
        elif k.startswith("text."):  # OpenCLIP's CustomTextCLIP already nests the text tower
            out[k] = v
        elif k.startswith(_OPENAI_TEXT):
            out["text." + k] = v
        else:
            out[k] = v
    return out


def to_openai(sd: StateDict) -> StateDict:
    return {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in sd.items()}


# --- Hugging Face transformers CLIPModel ---------------------------------------------------------------------

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
    return out | _fuse_qkv(qkv, "Hugging Face")


def _fuse_qkv(qkv: dict[str, dict[str, torch.Tensor]], source: str) -> StateDict:
    """{fused name: {"q": .., "k": .., "v": ..}} -> {fused name: q, k and v stacked}, as our Attention holds them."""
    out = {}
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{key}: {source} checkpoint lacks some of q/k/v (has {sorted(parts)})")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


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


# --- pretrained towers: BERT (Hugging Face's BertModel names) and EfficientNet-PyTorch ------------------------

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
    return out | _fuse_qkv(qkv, "BERT")


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


# --- configs inferred from shapes (foreign checkpoints without one) ------------------------------------------


def _count_blocks(sd: StateDict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def infer_config(sd: StateDict, activation: str | None = None, source: str = "openai") -> CLIPConfig:
    """Read the architecture off a native-layout state dict, as OpenAI's `build_model` does.

    The activation cannot be read off shapes: OpenAI's weights use QuickGELU, most OpenCLIP-trained ones exact
    GELU. Without `activation`, OpenAI sources get 'quick_gelu' and others 'gelu' with a warning."""
    if activation is None:
        activation = "quick_gelu" if source == "openai" else "gelu"
        if source != "openai":
            warnings.warn(
                f"the checkpoint does not record its activation; assuming {activation!r}. A wrong guess changes "
                "every embedding: pass activation='quick_gelu' for OpenAI-trained or '-quickgelu' OpenCLIP weights.",
                stacklevel=3,
            )
    try:
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                kind="vit",
                image_size=patch * grid,
                patch_size=patch,
                width=width,
                layers=_count_blocks(sd, "visual.transformer.resblocks."),
                heads=width // 64,
                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            )
        else:
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                kind="resnet",
                image_size=grid * 32,
                width=width,
                layers=tuple(_count_blocks(sd, f"visual.layer{b}.") for b in (1, 2, 3, 4)),
                heads=width * 32 // 64,
            )
        t_width = sd["text.ln_final.weight"].shape[0]
        vocab = sd["text.token_embedding.weight"].shape[0]
        text = TextConfig(
            context_length=sd["text.positional_embedding"].shape[0],
            vocab_size=vocab,
            width=t_width,
            heads=t_width // 64,
            layers=_count_blocks(sd, "text.transformer.resblocks."),
            mlp_ratio=sd["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / t_width,
            sot_token_id=vocab - 2,
            eot_token_id=vocab - 1,
        )
        return CLIPConfig(
            embed_dim=sd["text.text_projection"].shape[1],
            vision=vision,
            text=text,
            activation=activation,
            logit_bias_init=0.0 if "logit_bias" in sd else None,
            preprocess=PreprocessConfig(image_size=vision.image_size),
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the architecture: the state dict has no {e.args[0]!r}") from None
    except (IndexError, TypeError, ValueError, ArithmeticError) as e:  # shapes that no CLIP has
        raise CheckpointError(
            f"cannot infer the architecture from the tensor shapes ({e}); pass the preset it was trained with"
        ) from None


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
