"""End-to-end images/s embedding a folder of large JPEGs: clipforge's pipeline vs a clip-retrieval-style baseline.

    python bench/embed.py [--images 64] [--rounds 3] [--width 2000] [--height 1500] [--workers N]

Both sides use the same ViT-B-32 (random weights, fp32), the same decode worker count and batch size, and go
from files on disk to normalised float16 vectors on disk:

- baseline: the way clip-retrieval's inference does it: a torch DataLoader whose dataset opens each file with
  PIL, decodes it in full, and applies an open_clip-style eval transform (RGB, bicubic resize of the shorter
  side to 224, centre crop, to [0, 1], normalise); the main process runs encode_image, normalises, and
  collects float16 arrays, written as one .npy at the end.
- clipforge: `embed_to_folder` (worker processes, DCT-scaled JPEG draft decode, the same model), writing
  clip-retrieval's layout with parquet metadata and done-markers.

Sides run interleaved (A B A B ...) on the same folder; the speed-up is the median of per-round ratios, as
timings on shared cores drift. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import clipforge  # noqa: E402
from clipforge.encoder import Encoder  # noqa: E402
from clipforge.index.embed import default_workers, embed_to_folder  # noqa: E402
from clipforge.transforms import Preprocess  # noqa: E402

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def make_jpegs(folder: Path, n: int, w: int, h: int) -> None:
    """Photo-like JPEGs: smooth colour fields (upsampled noise) plus fine grain, quality 90."""
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, (h // 100, w // 100, 3), np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


class OpenClipStyle(torch.utils.data.Dataset):
    """Baseline dataset: full PIL decode, then resize / crop / normalise as open_clip's eval transform."""

    def __init__(self, paths: list[Path], size: int = 224) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.paths[i]).convert("RGB")
        w, h = img.size
        s = self.size
        nw, nh = (s, round(h * s / w)) if w <= h else (round(w * s / h), s)
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = round((nw - s) / 2), round((nh - s) / 2)
        img = img.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - MEAN) / STD


@torch.inference_mode()
def baseline(model, paths: list[Path], out: Path, batch_size: int, workers: int) -> None:
    loader = torch.utils.data.DataLoader(OpenClipStyle(paths), batch_size=batch_size, num_workers=workers)
    parts = []
    for x in loader:
        f = model.encode_image(x)
        parts.append((f / f.norm(dim=-1, keepdim=True)).to(torch.float16).numpy())
    np.save(out / "img_emb_0.npy", np.concatenate(parts))


class InputOnly(torch.nn.Module):
    """Stands in for the model to time the input stage alone (the regime of a GPU, where ViT-B-32 takes
    ~1 ms per image and decoding is the bottleneck): a fixed projection of 8x8-pooled pixels."""

    def __init__(self, config, dim: int = 512) -> None:
        super().__init__()
        self.config = config
        self.proj = torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(0))

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj  # (B, 512)
        return f / f.norm(dim=-1, keepdim=True) if normalize else f


class StubEncoder(Encoder):
    def __init__(self, enc: Encoder) -> None:
        self.__dict__.update(enc.__dict__)
        self.model = InputOnly(enc.model.config, enc.dim)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return self.model.encode_image(pixels, normalize=True).numpy()


def compare(model, enc, folder: Path, tmp: Path, a, label: str) -> tuple[list[float], list[float], float]:
    """Interleaved rounds of both sides; returns per-round seconds of each and the min cosine between them."""
    paths = sorted(folder.glob("*.jpg"))
    base_t, ours_t = [], []
    for r in range(a.rounds + 1):  # round 0 warms caches and the allocator; not counted
        bdir, odir = tmp / f"{label}b{r}", tmp / f"{label}o{r}"
        bdir.mkdir()
        tb = timed(baseline, model, paths, bdir, a.batch_size, a.workers)
        to = timed(embed_to_folder, folder, enc, odir, batch_size=a.batch_size, workers=a.workers)
        if r:
            base_t.append(tb)
            ours_t.append(to)
        print(
            f"{label} round {r}: baseline {a.images / tb:.2f} img/s, clipforge {a.images / to:.2f} img/s",
            file=sys.stderr,
        )
    x = np.load(tmp / f"{label}b1" / "img_emb_0.npy").astype(np.float32)
    y = np.load(tmp / f"{label}o1" / "img_emb" / "img_emb_0.npy").astype(np.float32)
    return base_t, ours_t, float(np.min(np.sum(x * y, axis=1)))


def timed(fn, *args, **kw) -> float:
    t = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=default_workers())
    a = ap.parse_args()

    model = clipforge.create_model("ViT-B-32", seed=0).eval()
    enc = Encoder(
        model, Preprocess(model.config.preprocess), None, name="ViT-B-32 (random)", batch_size=a.batch_size
    )
    enc.identity  # noqa: B018 - hash the weights once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        make_jpegs(folder, a.images, a.width, a.height)
        mb = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 1e6
        stub = StubEncoder(enc)
        results = {
            "end to end, ViT-B-32": compare(model, enc, folder, Path(tmp), a, "full"),
            "input stage only (model stubbed: the GPU regime)": compare(
                stub.model, stub, folder, Path(tmp), a, "io"
            ),
        }
    print(
        f"\n{a.images} JPEGs {a.width}x{a.height} ({mb:.0f} MB), ViT-B-32 fp32 random weights, batch "
        f"{a.batch_size}, {a.workers} decode workers, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| measurement | baseline img/s (clip-retrieval style) | clipforge embed img/s | speed-up | min cosine |"
    )
    print("|---|---|---|---|---|")
    for name, (bt, ot, cos) in results.items():
        ratio = statistics.median(b / o for b, o in zip(bt, ot))
        print(
            f"| {name} | {a.images / statistics.median(bt):.2f} | {a.images / statistics.median(ot):.2f} "
            f"| {ratio:.2f}x | {cos:.5f} |"
        )
    print("\nimages/s: median over rounds; speed-up: median of per-round ratios (interleaved A/B rounds).")


if __name__ == "__main__":
    main()
