"""clipforge's own directory: clipforge.json (config and weights' layout) beside the weights and tokenizer."""

from __future__ import annotations

import typing
from pathlib import Path

from clipforge.checkpoint.common import (
    FORMAT_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    Loaded,
    ReadOptions,
    read_json,
    read_state_dict,
    read_tokenizer,
)
from clipforge.model import config_json, convert
from clipforge.model.config import CLIPConfig
from clipforge.model.convert import CheckpointError


def probe(path: Path) -> bool:
    return path.is_dir() and (path / FORMAT_FILE).exists()


def read(d: Path, options: ReadOptions) -> Loaded:
    file = d / FORMAT_FILE
    meta = read_json(file)
    try:
        fmt, version = meta.get("format"), config_json.get(meta, "format_version", int, "", 0)
        if fmt != "clipforge" or version > FORMAT_VERSION:
            raise ValueError(
                f"unsupported format {fmt!r} v{version} (this clipforge reads v{FORMAT_VERSION})"
            )
        weights = config_json.get(meta, "weights", str, "", WEIGHTS_FILE)
        if Path(weights).name != weights or weights in ("", ".", ".."):
            raise ValueError(f"weights must name a file in the directory, found {weights!r}")
        layout = config_json.get(meta, "layout", typing.Literal["hf", "openai", "clipforge"], "", "openai")
        config_json.check_fields(CLIPConfig, config_json.get(meta, "config", dict, ""), "config")
        cfg = CLIPConfig.from_dict(meta["config"])
    except (ValueError, TypeError, ArithmeticError) as e:  # the dataclasses' own checks raise these too
        raise CheckpointError(f"{file}: {e}") from None
    sd, _ = read_state_dict(d / weights, options.keep)
    if layout != "clipforge":
        sd = convert.from_hf(sd) if layout == "hf" else convert.from_openai(sd)
    return Loaded(cfg, sd, read_tokenizer(d, cfg.text.context_length), f"clipforge checkpoint {d}")
