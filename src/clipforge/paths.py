"""Where clipforge keeps things it makes for the user: the open corpus, the default model, cached classifiers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CLIPFORGE_CACHE`, else `$XDG_CACHE_HOME/clipforge`, else `~/.cache/clipforge`."""
    if os.environ.get("CLIPFORGE_CACHE"):
        return Path(os.environ["CLIPFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "clipforge"


def corpus_dir() -> Path:
    return cache_dir() / "corpus"


def default_model_dir() -> Path:
    return cache_dir() / "models" / "default"


def features_dir() -> Path:
    """Locked towers' cached trunk outputs (`clipforge train --feature-cache auto`)."""
    return cache_dir() / "features"


def multilingual_model_dir() -> Path:
    """The default model with a multilingual text tower (`clipforge train-multilingual`)."""
    return cache_dir() / "models" / "default-multilingual"


def towers_dir() -> Path:
    """Pretrained tower weights unpacked by `clipforge data fetch-towers`, one folder per source."""
    return cache_dir() / "towers"
