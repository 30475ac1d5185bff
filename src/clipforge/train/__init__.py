"""Contrastive training: `train(cfg)` runs a TrainConfig in one process or under torchrun."""

from clipforge.train.config import PRESETS, TrainConfig, load_config
from clipforge.train.loop import train

__all__ = ["PRESETS", "TrainConfig", "load_config", "train"]
