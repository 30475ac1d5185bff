"""Fast JPEG path: Preprocess with `fast_jpeg=False` (full decode) vs `True` (Pillow draft: DCT-scaled
decode to 1/2, 1/4 or 1/8, then the same resize), on large synthetic photo-like JPEGs.

Reports per-image time of both sides, interleaved A/B over several rounds (median of per-round ratios, as
timings on shared cores drift), and how far the fast path moves the preprocessed tensors; when
`clipforge.create_model("ViT-B-32")` exists it also compares image embeddings of a random-init model.
Prints a Markdown table.

    python bench/jpeg_draft.py [--images 20] [--rounds 5] [--width 3000] [--height 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from clipforge.model.config import PreprocessConfig
from clipforge.transforms import Preprocess


def make_photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth low-frequency colour fields + a few blurred shapes + sensor-like noise: photo-like statistics
    (most energy at low frequencies, some edges, some texture) without needing any real photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, phase = rng.uniform(0.5, 3, 2) * 2 * np.pi, rng.uniform(0, 2 * np.pi)
        base[..., c] = 128 + 70 * np.sin(fx[0] * x / w + phase) * np.cos(fx[1] * y / h) + 40 * (y / h - 0.5)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 20, w // 3)), y0 + int(rng.integers(h // 20, h // 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))  # lens softness: no perfectly hard edges
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def time_side(pre: Preprocess, paths: list[Path]) -> tuple[float, list[torch.Tensor]]:
    t0 = time.perf_counter()
    out = [pre(p) for p in paths]
    return (time.perf_counter() - t0) / len(paths), out


def embedding_cosines(full: torch.Tensor, fast: torch.Tensor) -> str:
    """Cosine of image embeddings (random-init ViT-B-32) between the two paths, if the model exists yet."""
    try:
        import clipforge

        torch.manual_seed(0)
        model = clipforge.create_model("ViT-B-32").eval()
        with torch.no_grad():
            a, b = model.encode_image(full), model.encode_image(fast)
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        return f"min {cos.min().item():.6f}, median {cos.median().item():.6f}"
    except Exception as e:  # the model is being written by someone else; its absence is not an error here
        return f"not measured ({type(e).__name__}: {str(e)[:80]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=3000)
    ap.add_argument("--height", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(1)  # decoding is single-threaded; keep the normalise step comparable too

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            paths.append(Path(tmp) / f"photo_{i:02d}.jpg")
            make_photo(args.width, args.height, seed=i).save(paths[-1], "JPEG", quality=90)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        full = Preprocess(PreprocessConfig(image_size=args.image_size))
        fast = Preprocess(PreprocessConfig(image_size=args.image_size, fast_jpeg=True))
        time_side(full, paths[:2]), time_side(fast, paths[:2])  # warm-up: file cache, allocator

        t_full, t_fast, ratios = [], [], []
        for r in range(args.rounds):
            # Alternate which side goes first (A B, B A, ...) so drift in machine load hits both alike.
            order = [("full", full), ("fast", fast)] if r % 2 == 0 else [("fast", fast), ("full", full)]
            got = {name: time_side(pre, paths) for name, pre in order}
            t_full.append(got["full"][0])
            t_fast.append(got["fast"][0])
            ratios.append(got["full"][0] / got["fast"][0])
        a, b = torch.stack(got["full"][1]), torch.stack(got["fast"][1])  # (N, 3, S, S) each

    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"JPEG draft decode: {args.images} JPEGs {args.width}x{args.height} (quality 90, {mb:.2f} MB each), "
        f"Preprocess to {args.image_size}, {args.rounds} interleaved rounds, 1 torch thread; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load avg {load:.2f}\n"
    )
    print("| measure | fast_jpeg=False | fast_jpeg=True |")
    print("|---|---|---|")
    print(
        f"| ms / image (median of rounds) | {1e3 * statistics.median(t_full):.1f} | {1e3 * statistics.median(t_fast):.1f} |"
    )
    print(f"| speed-up (median of per-round ratios) | 1.00x | {statistics.median(ratios):.2f}x |")
    print(f"| tensor max abs diff (normalised units) | - | {diff.max().item():.4f} |")
    print(f"| tensor mean abs diff | - | {diff.mean().item():.5f} |")
    print(
        f"| tensor cosine (flattened, min / median) | - | {cos.min().item():.6f} / {cos.median().item():.6f} |"
    )
    print(f"| ViT-B-32 (random init) embedding cosine | - | {embedding_cosines(a, b)} |")


if __name__ == "__main__":
    main()
