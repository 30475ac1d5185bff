"""A bare weights file: OpenAI's TorchScript archives and state dicts, OpenCLIP's and clipforge's state dicts
(.pt/.bin/.pth pickles of tensors or .safetensors). It carries no config: `preset` names one, else the tensors'
shapes say it."""

from __future__ import annotations

from pathlib import Path

from clipforge.checkpoint.common import Loaded, ReadOptions, read_state_dict
from clipforge.model import convert
from clipforge.model.convert import CheckpointError
from clipforge.model.registry import get_config


def probe(path: Path) -> bool:
    return not path.is_dir()  # a missing file is named by read_state_dict


def read(p: Path, options: ReadOptions) -> Loaded:
    raw, source = read_state_dict(p)  # whole: the architecture is read from both towers' shapes
    layout = convert.detect_layout(raw)
    if layout == "hf":
        raise CheckpointError(f"{p}: Hugging Face weights need their directory (config.json beside them)")
    sd = raw if layout == "clipforge" else convert.from_openai(raw)
    is_openai = "TorchScript" in source or "input_resolution" in raw
    if options.preset is not None:
        cfg = get_config(options.preset)
        if options.activation is not None:
            cfg = cfg.replace(activation=options.activation)
    else:
        kind = "openai" if is_openai else "state dict"
        cfg = convert.infer_config(sd, activation=options.activation, source=kind)
    if options.keep is not None:
        sd = {k: v for k, v in sd.items() if options.keep(k)}
    return Loaded(cfg, sd, None, source)
