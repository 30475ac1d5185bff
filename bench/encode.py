"""Encoder speed: every clipforge fast path against Hugging Face transformers' CLIPModel on the same weights,
in one run. Image towers ViT-B-32, ViT-B-16, RN50 (224 px): batch-32 images/s and batch-1 latency. Text tower:
batch-256 texts/s on real-length captions (5-15 tokens) and on the 77-token worst case. Also the fraction of the
measured fp32 matmul peak, embedding cosine to clipforge fp32, and zero-shot accuracy of a small model trained
here for a minute on synthetic shapes, per precision.

open_clip is not compared: it imports torchvision, which this project does not install. RN50 has no
transformers implementation; its rows compare clipforge paths with clipforge fp32 (NCHW).

    PYTHONPATH=src python bench/encode.py [--quick] [--threads 2] [--train-seconds 60] [--no-onnx]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    count_flops,
    interleaved,
    load_average,
    machine,
    matmul_peak,
    median,
    ratio,
    set_threads,
    table,
)

import clipforge  # noqa: E402
from clipforge.fast import bf16_supported, optimize  # noqa: E402
from clipforge.model import convert  # noqa: E402

Fn = Callable[[], torch.Tensor]

SUBJECTS = ["dog", "cat", "red car", "old man", "small child", "bowl of soup", "mountain lake", "city street"]
PLACES = ["on the beach", "in the snow", "at night", "in a kitchen", "next to a wooden fence", "in the rain"]
STYLES = ["a photo of a", "a blurry picture of a", "a close-up photo of the", "an illustration of a"]


def real_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(STYLES)} {rng.choice(SUBJECTS)} {rng.choice(PLACES)}" for _ in range(n)]


def caption_tokens(captions: list[str], cfg) -> torch.Tensor:
    """Word-level ids (CLIP's vocabulary holds most common words as one token): [sot, words..., eot, 0...]."""
    t = cfg.text
    out = torch.zeros(len(captions), t.context_length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = (
            [t.sot_token_id]
            + [1 + zlib.crc32(w.encode()) % (t.vocab_size - 3) for w in c.split()]
            + [t.eot_token_id]
        )
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def full_tokens(n: int, cfg) -> torch.Tensor:
    t = cfg.text
    out = torch.randint(
        1, t.vocab_size - 3, (n, t.context_length), generator=torch.Generator().manual_seed(0)
    )
    out[:, 0], out[:, -1] = t.sot_token_id, t.eot_token_id
    return out


def hf_model(model):
    import transformers

    hf = transformers.CLIPModel(transformers.CLIPConfig(**convert.hf_config(model.config))).eval()
    missing, unexpected = hf.load_state_dict(convert.to_hf(model.state_dict()), strict=False)
    assert not [k for k in missing if "position_ids" not in k], missing
    return hf


def hf_image(hf, x: torch.Tensor) -> Fn:
    return lambda: hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output)


def hf_text(hf, t: torch.Tensor) -> Fn:
    return lambda: hf.text_projection(hf.text_model(input_ids=t).pooler_output)


def variants(model, with_compile: bool) -> dict[str, torch.nn.Module]:
    out = {"clipforge fp32": model}
    if model.config.vision.kind != "vit":
        out["clipforge fp32 NCHW"] = copy.deepcopy(model)  # `model` itself gets channels-last below
        optimize(model, channels_last=True)
    out["clipforge bf16"] = optimize(copy.deepcopy(model), precision="bf16")
    out["clipforge int8"] = optimize(copy.deepcopy(model), precision="int8")
    if with_compile:
        out["clipforge fp32 compile"] = optimize(copy.deepcopy(model), compile=True)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float(), b.float()).min().item()


def measure(
    fns: dict[str, Fn], base: str, rounds: int, n_items: int, flops: float, peak: float
) -> list[list]:
    """Rows: name, items/s (median), ms/call, ratio vs base (median of per-round ratios), % of matmul peak,
    cosine to clipforge fp32."""
    with torch.no_grad():
        ref = fns["clipforge fp32"]() if "clipforge fp32" in fns else None
        cos = {k: cosine(fn(), ref) if ref is not None else float("nan") for k, fn in fns.items()}
    t0 = time.time()
    times = interleaved(fns, rounds)
    print(f"  [{time.time() - t0:.0f} s for {len(fns)} paths x {rounds} rounds]", file=sys.stderr, flush=True)
    rows = []
    for k, ts in times.items():
        m = median(ts)
        rows.append(
            [
                k,
                f"{n_items / m:.1f}",
                f"{1000 * m:.0f}",
                f"{ratio(times[base], ts):.2f}x",
                f"{100 * flops / m / 1e9 / peak:.0f}%",
                f"{cos[k]:.5f}",
            ]
        )
    return rows


HEADER = ["path", "items/s", "ms/call", "vs ref", "% fp32 peak", "cos vs fp32"]


def bench_image(name: str, args, peak: float, onnx_dir: Path | None) -> list[str]:
    model = clipforge.create_model(name, seed=0).eval()
    size = model.config.vision.image_size
    heavy = name != "ViT-B-32"
    batch = 8 if (args.quick and heavy) else 32
    x32 = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    x1 = x32[:1].clone()
    ms = variants(model, with_compile=args.compile and not heavy)
    fns32: dict[str, Fn] = {}
    fns1: dict[str, Fn] = {}
    base = "clipforge fp32 NCHW"
    if model.config.vision.kind == "vit":
        hf = hf_model(model)
        fns32["transformers fp32"], fns1["transformers fp32"] = hf_image(hf, x32), hf_image(hf, x1)
        base = "transformers fp32"
    for k, m in ms.items():
        fns32[k], fns1[k] = (lambda m=m, x=x32: m.encode_image(x)), (lambda m=m, x=x1: m.encode_image(x))
    if onnx_dir is not None and not heavy:
        om, _, _ = clipforge.load(onnx_dir)
        fns32["onnxruntime fp32"], fns1["onnxruntime fp32"] = (
            lambda: om.encode_image(x32),
            lambda: om.encode_image(x1),
        )
    flops = count_flops(lambda: model.encode_image(x1))
    r32 = 2 if heavy else 3
    rows = measure(fns32, base, r32, batch, flops * batch, peak)
    rows1 = measure(fns1, base, 3 if heavy else 8, 1, flops, peak)
    return [
        f"\n### {name} image tower, batch {batch} ({flops / 1e9:.1f} GFLOP/image, {r32} rounds)\n",
        table(HEADER, rows),
        f"\n### {name} image tower, batch 1 latency\n",
        table(HEADER, rows1),
    ]


def bench_text(args, peak: float, onnx_dir: Path | None, threads_label: str) -> list[str]:
    model = clipforge.create_model("ViT-B-32", seed=0).eval()
    cfg = model.config
    real = caption_tokens(real_captions(64 if args.quick else 256), cfg)
    lengths = (real != 0).sum(1).float()
    worst = full_tokens(16 if args.quick else 64, cfg)
    hf = hf_model(model)
    ms = variants(model, with_compile=False)
    longest = int(lengths.max())
    om = clipforge.load(onnx_dir)[0] if onnx_dir is not None else None
    out = []
    r = 2 if args.quick else 3
    for label, toks, rounds in (("real captions", real, r), ("77-token worst case", worst, 2)):
        fns: dict[str, Fn] = {"transformers fp32 (77 padded)": hf_text(hf, toks)}
        if label == "real captions":
            fns["transformers fp32 (padded to longest)"] = hf_text(hf, toks[:, :longest].contiguous())
        for k, m in ms.items():
            fns[k] = lambda m=m, t=toks: m.encode_text(t)
        if om is not None:
            fns["onnxruntime fp32"] = lambda t=toks: om.encode_text(t)
        flops77 = count_flops(hf_text(hf, toks[:1])) * len(toks)  # per-text cost is batch-independent
        rows = measure(fns, "transformers fp32 (77 padded)", rounds, len(toks), flops77, peak)
        note = (
            f"lengths {int(lengths.min())}-{longest}, mean {lengths.mean():.1f}"
            if label == "real captions"
            else ""
        )
        out += [f"\n### text tower, {label}, batch {len(toks)} {note} {threads_label}\n", table(HEADER, rows)]
        out.append("(% peak counts the 77-token work the reference does; trimmed paths do less work.)")
    one = real[:1]
    fns1 = {"transformers fp32 (77 padded)": hf_text(hf, one)}
    fns1.update({k: (lambda m=m: m.encode_text(one)) for k, m in ms.items()})
    rows = measure(fns1, "transformers fp32 (77 padded)", 8, 1, count_flops(lambda: hf_text(hf, one)()), peak)
    out += ["\n### text tower, batch 1 latency (one real caption)\n", table(HEADER, rows)]
    return out


def train_tiny(seconds: float):
    """A `tiny` CLIP trained for `seconds` on coloured shapes; returns model, tokenizer, held-out set."""
    from clipforge.data.synthetic import shape_samples
    from clipforge.loss import clip_loss
    from clipforge.tokenizer import train_tokenizer
    from clipforge.transforms import Preprocess

    train, held = shape_samples(1200, size=64, seed=0), shape_samples(240, size=64, seed=123)
    tok = train_tokenizer([c for s in train for c in s.captions], vocab_size=600, context_length=32)
    cfg = clipforge.get_config("tiny").replace(
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    model = clipforge.create_model(cfg, seed=0)
    pre = Preprocess(cfg.preprocess)
    images = torch.stack([pre(s.image) for s in train])
    tokens = [tok(s.captions) for s in train]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    start, steps = time.time(), 0
    model.train()
    while time.time() - start < seconds:
        idx = torch.randperm(len(train), generator=g)[:128]
        cap = torch.stack([tokens[i][torch.randint(0, 3, (1,), generator=g).item()] for i in idx.tolist()])
        out = model(images[idx], cap)
        loss = clip_loss(out.image_features, out.text_features, out.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    model.eval()
    return model, tok, held, pre, steps, loss.item()


def zero_shot(model, tok, held, pre) -> tuple[float, torch.Tensor, torch.Tensor]:
    labels = sorted({s.label for s in held})
    with torch.no_grad():
        txt = model.encode_text(tok([f"a {lb}" for lb in labels]), normalize=True)
        img = model.encode_image(torch.stack([pre(s.image) for s in held]), normalize=True)
    pred = (img @ txt.t()).argmax(1)
    truth = torch.tensor([labels.index(s.label) for s in held])
    return (pred == truth).float().mean().item(), img, txt


def bench_accuracy(args) -> list[str]:
    from clipforge.onnx_export import export_onnx

    model, tok, held, pre, steps, loss = train_tiny(args.train_seconds)
    acc, img, txt = zero_shot(model, tok, held, pre)
    rows = [["fp32", f"{100 * acc:.1f}%", "1.00000", "1.00000"]]
    paths = {p: optimize(copy.deepcopy(model), precision=p) for p in ("bf16", "int8")}
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as d:
            export_onnx(model, Path(d) / "onnx", tok)
            a, i2, t2 = zero_shot(clipforge.load(Path(d) / "onnx")[0], tok, held, pre)
            rows.append(
                ["onnxruntime", f"{100 * a:.1f}%", f"{cosine(i2, img):.5f}", f"{cosine(t2, txt):.5f}"]
            )
    for p, m in paths.items():
        a, i2, t2 = zero_shot(m, tok, held, pre)
        rows.append([p, f"{100 * a:.1f}%", f"{cosine(i2, img):.5f}", f"{cosine(t2, txt):.5f}"])
    return [
        f"\n### zero-shot accuracy, `tiny` trained {args.train_seconds:.0f} s ({steps} steps, loss {loss:.3f}), "
        f"{len(held)} held-out shapes, {len({s.label for s in held})} classes\n",
        table(["precision", "zero-shot acc", "min image cos", "min text cos"], rows),
    ]


def export_vit_b32(d: Path) -> Path:
    from clipforge.onnx_export import export_onnx

    return export_onnx(clipforge.create_model("ViT-B-32", seed=0).eval(), d / "onnx")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="fewer rounds, smaller heavy batches, no compile/onnx"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile (ViT-B-32; ~1 min compile)"
    )
    ap.add_argument("--towers", default="ViT-B-32,ViT-B-16,RN50")
    args = ap.parse_args()
    if args.quick:
        args.no_onnx, args.train_seconds = True, min(args.train_seconds, 20.0)
    set_threads(args.threads)
    peak = matmul_peak()
    out = [
        "## clipforge encode benchmark\n",
        f"machine: {machine()}; load before: {load_average()}; native bf16: {bf16_supported()}",
        f"measured fp32 matmul peak (2048^3 torch.mm): {peak:.0f} GFLOP/s",
        "open_clip: not compared (imports torchvision, which is not installed)",
    ]
    print("\n".join(out), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = None if args.no_onnx else export_vit_b32(Path(tmp))
        sections = [lambda: bench_text(args, peak, onnx_dir, f"({args.threads} threads)")]
        sections += [lambda n=n: bench_image(n, args, peak, onnx_dir) for n in args.towers.split(",") if n]
        sections.append(lambda: bench_accuracy(args))
        if not args.quick:
            sections.append(lambda: one_thread(args))
        for section in sections:
            lines = section()
            print("\n".join(lines), flush=True)
            out += lines
    print(f"\nload after: {load_average()}")


def one_thread(args) -> list[str]:
    """ViT-B-32 image batch 32 and real-caption text at 1 thread: less sensitive to other jobs on the cores."""
    set_threads(1)
    peak = matmul_peak(reps=3)
    model = clipforge.create_model("ViT-B-32", seed=0).eval()
    hf = hf_model(model)
    int8 = optimize(copy.deepcopy(model), precision="int8")
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    toks = caption_tokens(real_captions(256), model.config)
    flops = count_flops(lambda: model.encode_image(x[:1])) * 32
    img = {
        "transformers fp32": hf_image(hf, x),
        "clipforge fp32": lambda: model.encode_image(x),
        "clipforge int8": lambda: int8.encode_image(x),
    }
    txt = {
        "transformers fp32 (77 padded)": hf_text(hf, toks),
        "clipforge fp32": lambda: model.encode_text(toks),
        "clipforge int8": lambda: int8.encode_text(toks),
    }
    tflops = count_flops(hf_text(hf, toks[:1])) * len(toks)
    out = [
        f"\n### 1 thread (peak {peak:.0f} GFLOP/s): ViT-B-32 image batch 32\n",
        table(HEADER, measure(img, "transformers fp32", 2, 32, flops, peak)),
        "\n### 1 thread: text tower, 256 real captions\n",
        table(HEADER, measure(txt, "transformers fp32 (77 padded)", 2, 256, tflops, peak)),
    ]
    set_threads(args.threads)
    return out


if __name__ == "__main__":
    main()
