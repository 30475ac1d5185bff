"""Load test of `clipforge serve` from a second process on loopback: latency, errors and server memory.

    python bench/serve_load.py                        # 2,000 mixed requests, 16 at a time, paced over ~30 s
    python bench/serve_load.py --requests 400 --duration 8 --images 200     # a quick run

Builds a collection of synthetic shape images with a small random CLIP (the `tiny` preset: real encoder work,
no download), starts `python -m clipforge serve` as a subprocess, warms it up, then sends a paced mix:
text search (half of them repeating a query, half new), "more like this", image search (base64 upload),
thumbnails, zero-shot classification and health checks. Reports p50/p99 latency per kind and overall, the
error count, and the server's resident memory (VmRSS) after warm-up, half-way and at the end: flat memory
means the second half adds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(workdir: Path, n_images: int) -> tuple[Path, Path]:
    """A random `tiny` CLIP with a tokenizer trained on shape captions, and a collection of n images."""
    import clipforge
    from clipforge.checkpoint import save_model
    from clipforge.data.synthetic import shape_samples, write_shapes
    from clipforge.encoder import Encoder
    from clipforge.index import Collection

    captions = [c for s in shape_samples(96, seed=0) for c in s.captions]
    tok = clipforge.train_tokenizer(captions, 600, context_length=32)
    cfg = clipforge.get_config("tiny").replace(
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    model_dir = save_model(clipforge.create_model(cfg, seed=0), workdir / "model", tokenizer=tok)
    write_shapes(workdir / "shapes", n_images, size=64, seed=1)
    enc = Encoder.load(model_dir)
    with Collection.create(workdir / "col", identity=enc.identity, dim=enc.dim) as col:
        col.add([workdir / "shapes" / "images"], enc)
    return model_dir, workdir / "col"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request_mix(
    n: int, n_items: int, images: list[str], seed: int
) -> list[tuple[str, str, str, dict | None]]:
    """(kind, method, url, json) for n requests in a fixed random order."""
    from clipforge.data.synthetic import COLORS, SHAPES

    rng = random.Random(seed)
    labels = [f"{c} {s}" for c in COLORS for s in SHAPES]
    kinds = (
        ["text"] * 40 + ["text_new"] * 10 + ["like"] * 15 + ["image"] * 15 + ["thumb"] * 10 + ["classify"] * 5
    )
    kinds += ["health"] * 5
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        item = rng.randint(1, n_items)
        if kind == "text":
            out.append((kind, "GET", f"/api/search?q=a+{rng.choice(labels).replace(' ', '+')}&k=24", None))
        elif kind == "text_new":
            out.append(
                (kind, "GET", f"/api/search?q=a+{rng.choice(labels).replace(' ', '+')}+number+{i}&k=24", None)
            )
        elif kind == "like":
            out.append((kind, "POST", "/api/search", {"like": item, "k": 24}))
        elif kind == "image":
            out.append((kind, "POST", "/api/search", {"image": rng.choice(images), "k": 24}))
        elif kind == "thumb":
            out.append((kind, "GET", f"/api/thumbs/{item}", None))
        elif kind == "classify":
            out.append((kind, "POST", "/api/classify", {"id": item, "labels": rng.sample(labels, 6)}))
        else:
            out.append((kind, "GET", "/healthz", None))
    return out


async def run_load(base: str, reqs: list, concurrency: int, duration: float) -> list[tuple[str, float, int]]:
    """Send `reqs` from `concurrency` connections, request i not before start + i * duration / len(reqs)."""
    import httpx

    results: list[tuple[str, float, int]] = []
    next_i = 0
    t0 = time.perf_counter()
    gap = duration / max(len(reqs), 1)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < len(reqs):
            i = next_i
            next_i += 1
            delay = t0 + i * gap - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            kind, method, url, body = reqs[i]
            t = time.perf_counter()
            try:
                r = await client.request(method, url, json=body)
                status = r.status_code
            except httpx.HTTPError:
                status = -1
            results.append((kind, time.perf_counter() - t, status))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000


def table(results: list[tuple[str, float, int]], wall: float) -> str:
    rows = ["| requests | count | errors | p50 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|---:|"]
    kinds = sorted({k for k, _, _ in results})
    for kind in [*kinds, "all"]:
        sel = [(t, s) for k, t, s in results if kind in ("all", k)]
        lat = [t for t, _ in sel]
        errors = sum(1 for _, s in sel if not 200 <= s < 300)
        name = f"**{kind}** ({len(sel) / wall:.0f} req/s)" if kind == "all" else kind
        rows.append(
            f"| {name} | {len(sel)} | {errors} | {pct(lat, 0.5):.1f} | {pct(lat, 0.99):.1f} "
            f"| {1000 * statistics.mean(lat):.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0, help="pace the requests over this many seconds")
    ap.add_argument("--images", type=int, default=1000, help="images in the collection")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from clipforge.data.synthetic import shape_samples

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir, col = build(Path(tmp), args.images)
        print(
            f"built model + {args.images}-image collection in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CLIPFORGE_CACHE": str(Path(tmp) / "cache")}
        env.pop("CLIPFORGE_TOKEN", None)
        cmd = [
            sys.executable,
            "-m",
            "clipforge",
            "serve",
            str(col),
            "--model",
            str(model_dir),
            "--port",
            str(port),
        ]
        server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
            pngs = []
            for s in shape_samples(8, seed=99):
                buf = io.BytesIO()
                s.image.save(buf, "PNG")
                pngs.append(base64.b64encode(buf.getvalue()).decode())
            reqs = request_mix(args.requests, args.images, pngs, args.seed)
            warm = request_mix(100, args.images, pngs, args.seed + 1)
            asyncio.run(run_load(base, warm, args.concurrency, 0.0))
            rss = [rss_mb(server.pid)]
            half = len(reqs) // 2
            t = time.perf_counter()
            results = asyncio.run(run_load(base, reqs[:half], args.concurrency, args.duration / 2))
            rss.append(rss_mb(server.pid))
            results += asyncio.run(run_load(base, reqs[half:], args.concurrency, args.duration / 2))
            wall = time.perf_counter() - t
            rss.append(rss_mb(server.pid))
        finally:
            server.terminate()
            server.wait(10)
    load = os.getloadavg()
    print(
        f"\n{len(results)} requests in {wall:.1f} s at concurrency {args.concurrency}, collection of "
        f"{args.images} images, `tiny` model, 1 worker; machine load {load[0]:.2f} on {os.cpu_count()} cores\n"
    )
    print(table(results, wall))
    print(
        f"\nserver RSS: {rss[0]:.0f} MB after warm-up, {rss[1]:.0f} MB half-way, {rss[2]:.0f} MB at the end "
        f"(second half: {rss[2] - rss[1]:+.1f} MB)"
    )


if __name__ == "__main__":
    main()
