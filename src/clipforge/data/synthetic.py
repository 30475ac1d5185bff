"""Synthetic image-caption data whose right answers are known: coloured shapes on white.

Tests train small models on it and assert accuracy, not only shapes; a model that learns anything at all
separates 'a red circle' from 'a blue square' within a few hundred steps on a CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image
    color: str
    shape: str

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def captions(self) -> list[str]:
        return [
            f"a {self.color} {self.shape}",
            f"a drawing of a {self.color} {self.shape}",
            f"{self.color} {self.shape} on white",
        ]


def draw_shape(color: str, shape: str, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One shape of random size and position (fully inside the canvas) on a white square canvas."""
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    return img


def shape_samples(n: int, size: int = 64, seed: int = 0) -> list[ShapeSample]:
    """n samples cycling through every (colour, shape) pair, so each class appears about equally often."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    out = []
    for i in range(n):
        color, shape = pairs[i % len(pairs)]
        out.append(ShapeSample(draw_shape(color, shape, size, rng), color, shape))
    return out


def write_shapes(out_dir: str | Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """PNG files plus `manifest.jsonl` lines {"image", "captions", "label"}; returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(shape_samples(n, size, seed)):
        rel = f"images/{i:05d}.png"
        s.image.save(out / rel)
        lines.append(json.dumps({"image": rel, "captions": s.captions, "label": s.label}))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
