"""The only place that knows foreign tensor names: OpenAI's, OpenCLIP's and Hugging Face's, and those of the
pretrained towers (Hugging Face's BertModel as sentence-transformers ships it, EfficientNet-PyTorch).

clipforge's own names are OpenAI's inside each tower, with the text tower gathered under `text.` (OpenAI keeps
its parts at the top level). Each function maps a whole state dict; shapes are never guessed except by
`infer_config`, used only for foreign checkpoints that carry no config.

The converters live one module per source format, and this module gathers their public names (import them
from here): `convert_openai` (OpenAI and OpenCLIP, and configs inferred from shapes), `convert_hf`
(transformers' CLIPModel), `convert_pretrained` (BertModel, EfficientNet-PyTorch); what they share (the
state dict type, CheckpointError, the fit check) is in `state_dict`.
"""

from __future__ import annotations

from clipforge.model.convert_hf import config_from_hf, from_hf, hf_config, to_hf
from clipforge.model.convert_openai import from_openai, infer_config, to_openai
from clipforge.model.convert_pretrained import (
    BERT_DROPPED,
    EFFNET_DROPPED,
    bert_config_from_hf,
    from_bert,
    from_efficientnet_pytorch,
)
from clipforge.model.state_dict import (
    CheckpointError,
    StateDict,
    check_state_dict,
    detect_layout,
    tower_of,
    unwrap,
)

__all__ = [
    "BERT_DROPPED",
    "EFFNET_DROPPED",
    "CheckpointError",
    "StateDict",
    "bert_config_from_hf",
    "check_state_dict",
    "config_from_hf",
    "detect_layout",
    "from_bert",
    "from_efficientnet_pytorch",
    "from_hf",
    "from_openai",
    "hf_config",
    "infer_config",
    "to_hf",
    "to_openai",
    "tower_of",
    "unwrap",
]
