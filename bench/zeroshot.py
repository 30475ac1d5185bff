"""Zero-shot classification: time to build a classifier (classes x templates) and images/s through it,
clipforge against the same steps written with Hugging Face transformers, in one run, on the same random
ViT-B-32 weights (converted with clipforge.model.convert.to_hf) and the same tokenizer files.

    python bench/zeroshot.py                                  # 1,000 classes x 80 templates (slow on CPU)
    python bench/zeroshot.py --classes 100 --templates 8 --images 64 --repeats 3

Steps timed on each side:
- build: tokenize every "template.format(class)", encode, normalise, average per class, re-normalise;
- classify: encode a batch of preprocessed images, normalise, logits against the (D, C) classifier, softmax.
The two sides alternate (A B A B ...); the table gives medians and the median of per-pair ratios.
The text embedding table is sized to a tokenizer trained here (no downloaded vocabulary); every other weight
has ViT-B-32's shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import clipforge  # noqa: E402
from clipforge.encoder import Encoder  # noqa: E402
from clipforge.model import convert  # noqa: E402
from clipforge.transforms import Preprocess  # noqa: E402
from clipforge.zeroshot import embed_classes, load_templates  # noqa: E402

ADJ = ["red", "small", "wild", "old", "striped", "wooden", "electric", "frozen", "golden", "tiny"]
NOUN = ["fox", "boat", "guitar", "mushroom", "bridge", "kettle", "owl", "tractor", "lamp", "cactus"]


def class_names(n: int) -> list[str]:
    base = [f"{a} {b}" for a in ADJ for b in NOUN]  # 100 two-word names
    return [base[i % 100] + ("" if i < 100 else f" type {i // 100}") for i in range(n)]


def build_sides(texts: list[str]):
    tok = clipforge.train_tokenizer(texts, 4000, context_length=77)
    cfg = clipforge.get_config("ViT-B-32").replace(
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    model = clipforge.create_model(cfg, seed=0).eval()
    enc = Encoder(model, Preprocess(cfg.preprocess), tok, batch_size=64)

    import transformers

    hf = transformers.CLIPModel(transformers.CLIPConfig(**convert.hf_config(cfg))).eval()
    missing, unexpected = hf.load_state_dict(convert.to_hf(model.state_dict()), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    d = tempfile.mkdtemp()
    tok.save(d)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(d)
    return enc, hf, hf_tok


@torch.inference_mode()
def hf_build(hf, hf_tok, names: list[str], templates: list[str], batch: int = 256) -> np.ndarray:
    texts = [t.format(n) for n in names for t in templates]
    out = []
    for i in range(0, len(texts), batch):
        ids = hf_tok(texts[i : i + batch], padding=True, return_tensors="pt")
        f = hf.get_text_features(**ids)
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        out.append(F.normalize(f, dim=-1))
    e = torch.cat(out).view(len(names), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1).T.numpy()


@torch.inference_mode()
def hf_classify(hf, pixels: torch.Tensor, weights: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch):
        f = hf.get_image_features(pixel_values=pixels[i : i + batch])
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        out.append((100.0 * F.normalize(f, dim=-1) @ weights).softmax(-1))
    return torch.cat(out)


def ours_classify(enc: Encoder, pixels: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    logits = 100.0 * enc.embed_pixels(pixels) @ weights
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--templates", type=int, default=80)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    templates = load_templates("ensemble")
    templates = (templates * (args.templates // len(templates) + 1))[: args.templates]
    names = class_names(args.classes)
    enc, hf, hf_tok = build_sides([t.format(n) for n in names[:100] for t in templates])
    pixels = torch.randn(args.images, 3, 224, 224)

    # Same weights, same tokens: the two classifiers must agree before their speeds mean anything.
    w_ours = embed_classes(enc, names[:20], templates[:4])
    w_hf = hf_build(hf, hf_tok, names[:20], templates[:4])
    assert np.abs(w_ours - w_hf).max() < 1e-4, np.abs(w_ours - w_hf).max()

    rows: dict[str, list[tuple[float, float]]] = {"build": [], "classify": []}
    for _ in range(args.repeats):
        t_o, w = timed(lambda: embed_classes(enc, names, templates))
        t_h, w_h = timed(lambda: hf_build(hf, hf_tok, names, templates))
        rows["build"].append((t_o, t_h))
        t_o, _ = timed(lambda w=w: ours_classify(enc, pixels, w))
        t_h, _ = timed(lambda w_h=w_h: hf_classify(hf, pixels, torch.from_numpy(w_h)))
        rows["classify"].append((t_o, t_h))

    load = os.getloadavg()[0]
    print(
        f"\nViT-B-32 (random weights), {args.classes} classes x {args.templates} templates, {args.images} images, "
        f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f}\n"
    )
    print("| step | clipforge | transformers | transformers / clipforge |")
    print("|---|---|---|---|")
    b = rows["build"]
    print(
        f"| build {args.classes} x {args.templates} classifier (s) | {statistics.median(x for x, _ in b):.2f} | "
        f"{statistics.median(y for _, y in b):.2f} | {statistics.median(y / x for x, y in b):.2f}x |"
    )
    c = rows["classify"]
    ips = lambda t: args.images / t
    print(
        f"| classify, images/s ({args.classes} classes) | {statistics.median(ips(x) for x, _ in c):.1f} | "
        f"{statistics.median(ips(y) for _, y in c):.1f} | {statistics.median(y / x for x, y in c):.2f}x |"
    )


if __name__ == "__main__":
    main()
