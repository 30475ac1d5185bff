"""Training throughput: clipforge vs a reference implementation, same architecture, batch, data and optimiser.

One training step = forward of both towers, the symmetric InfoNCE loss, backward, AdamW step, fp32 on CPU.
Reference: Hugging Face transformers' CLIPModel with `return_loss=True` (open_clip cannot be imported here: it
needs torchvision, which this torch build lacks). Both models are built from the same clipforge config, so
they have the same shapes and parameter counts.

Timing interleaves the two sides (A B A B ...) and reports medians and the median of per-pair ratios, because
shared cores vary a lot from minute to minute. Peak memory (peak RSS, VmHWM) is measured in a fresh subprocess per side,
so neither side's allocations count against the other.

    python bench/train.py                      # tiny and ViT-B-32, batch 32
    python bench/train.py --models tiny --pairs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from clipforge.model import create_model, get_config
from clipforge.model.convert import hf_config
from clipforge.train.step import forward_backward


def make_batch(cfg, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    t = cfg.text
    tokens = torch.zeros(batch, t.context_length, dtype=torch.long)
    lengths = torch.randint(5, 20, (batch,), generator=g)  # caption-like lengths
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0] = t.sot_token_id
        tokens[i, 1 : n + 1] = torch.randint(1, t.sot_token_id, (n,), generator=g)
        tokens[i, n + 1] = t.eot_token_id
    return images, tokens


def clipforge_step(name: str):
    cfg = get_config(name)
    model = create_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(images, tokens):
        forward_backward(model, images, tokens, loss="clip")
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step


def hf_step(name: str):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    cfg = get_config(name)
    hc = hf_config(cfg)
    model = CLIPModel(
        HFConfig(
            text_config=hc["text_config"], vision_config=hc["vision_config"], projection_dim=cfg.embed_dim
        )
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(images, tokens):
        mask = (tokens != 0) | (torch.arange(tokens.shape[1]) == 0)
        out = model(input_ids=tokens, pixel_values=images, attention_mask=mask.long(), return_loss=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step


SIDES = {"clipforge": clipforge_step, "hf": hf_step}


def peak_rss_mb(side: str, name: str, batch: int, steps: int) -> float:
    """Peak RSS (VmHWM) of a fresh process that builds one side and runs `steps` training steps."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import train as b; cfg, step = b.SIDES[{side!r}]({name!r}); "
        f"x = b.make_batch(cfg, {batch})\nfor _ in range({steps}): step(*x)\n"
        # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork + exec.
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def bench_model(name: str, batch: int, pairs: int, memory_steps: int) -> dict:
    sides = {s: f(name) for s, f in SIDES.items()}
    cfg = sides["clipforge"][0]
    x = make_batch(cfg, batch)
    for _, step in sides.values():  # warm-up: first-call allocations, kernel selection
        step(*x)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for _ in range(pairs):
        for s, (_, step) in sides.items():
            t = time.perf_counter()
            step(*x)
            times[s].append(time.perf_counter() - t)
    ratios = [h / c for c, h in zip(times["clipforge"], times["hf"])]
    return {
        "model": name,
        "batch": batch,
        "pairs": pairs,
        "clipforge_samples_s": batch / statistics.median(times["clipforge"]),
        "hf_samples_s": batch / statistics.median(times["hf"]),
        "speed_ratio": statistics.median(ratios),  # > 1: clipforge is faster
        "clipforge_peak_mb": peak_rss_mb("clipforge", name, batch, memory_steps),
        "hf_peak_mb": peak_rss_mb("hf", name, batch, memory_steps),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| model | batch | clipforge samples/s | HF CLIPModel samples/s | speed ratio (median of pairs) "
        "| clipforge peak RSS MB | HF peak RSS MB |\n|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['model']} | {r['batch']} | {r['clipforge_samples_s']:.1f} | {r['hf_samples_s']:.1f} | "
        f"{r['speed_ratio']:.2f}x | {r['clipforge_peak_mb']:.0f} | {r['hf_peak_mb']:.0f} |\n"
        for r in rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "ViT-B-32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--pairs", type=int, default=None, help="timed A/B pairs (default: 8 for tiny, 3 otherwise)"
    )
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load[0]:.1f}",
        flush=True,
    )
    rows = []
    for m in a.models:  # each row is printed when done: ViT-B-32 on a busy 2-core machine takes minutes
        rows.append(bench_model(m, a.batch, a.pairs or (8 if m == "tiny" else 3), a.memory_steps))
        print(json.dumps(rows[-1]) if a.json else table(rows[-1:]), flush=True)
    if len(rows) > 1 and not a.json:
        print(table(rows))


if __name__ == "__main__":
    main()
