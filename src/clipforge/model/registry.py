"""Named presets: each is a JSON file in presets/ holding a CLIPConfig. Looked up by name; nothing is executed."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from clipforge import paths
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig

_PRESETS = Path(__file__).parent / "presets"


@cache
def _preset_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in _PRESETS.glob("*.json")))


def list_models() -> list[str]:
    """Names of the architecture presets `create_model` accepts."""
    return list(_preset_names())


def get_config(name: str) -> CLIPConfig:
    if name not in _preset_names():
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(_preset_names())}")
    d = json.loads((_PRESETS / f"{name}.json").read_text())
    return CLIPConfig.from_dict({**d, "name": name})


def create_model(
    name_or_config: str | CLIPConfig, *, seed: int | None = None, pretrained: str | Path | None = None
) -> CLIP:
    """A randomly initialised model with the paper's initialisation, from a preset name or a config.

    `pretrained`: a towers folder (`clipforge data fetch-towers` fills the cache's towers/): the towers that have
    pretrained weights there (EfficientNet-Lite0, BERT/MiniLM) load them; the projections stay new."""
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if seed is None:
        model = CLIP(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(cfg)
    if pretrained is not None:
        from clipforge.model.pretrained import load_pretrained_towers

        load_pretrained_towers(model, pretrained)
    return model


def pretrained_towers(
    name_or_config: str | CLIPConfig, towers_dir: str | Path | None = None, *, seed: int | None = None
) -> CLIP:
    """`create_model(name_or_config, seed=seed)` with its towers loaded from `towers_dir` (default: the
    clipforge cache's towers/, filled by `clipforge data fetch-towers`)."""
    return create_model(name_or_config, seed=seed, pretrained=towers_dir or paths.towers_dir())
