"""OpenAI's and OpenCLIP's layout (text-tower parts at the top level) <-> clipforge's (gathered under `text.`),
and the architecture read off a native-layout state dict's shapes for foreign checkpoints that carry no config."""

from __future__ import annotations

import re
import warnings

from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.model.state_dict import OPENAI_TEXT, CheckpointError, StateDict

# OpenAI's top-level names of text-tower parts.
# Entries that some OpenAI / OpenCLIP files carry but that are not weights.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def from_openai(sd: StateDict) -> StateDict:
    out = {}
    for k, v in sd.items():
        if k in _NOT_WEIGHTS or k.endswith("attn_mask"):
            continue
        if k.startswith("text.text_projection.weight"):  # OpenCLIP's CustomTextCLIP keeps a Linear
            out["text.text_projection"] = v.t()
        elif k.startswith("text."):  # OpenCLIP's CustomTextCLIP already nests the text tower
            out[k] = v
        elif k.startswith(OPENAI_TEXT):
            out["text." + k] = v
        else:
            out[k] = v
    return out


def to_openai(sd: StateDict) -> StateDict:
    return {(k[len("text.") :] if k.startswith("text.") else k): v for k, v in sd.items()}


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
