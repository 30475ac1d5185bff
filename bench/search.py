"""Query latency, recall@10 and memory of the collection's index kinds on clustered 512-d vectors.

    python bench/search.py                 # 1,000,000 vectors
    python bench/search.py --quick         # 100,000 vectors
    python bench/search.py --n 300000 --skip hnsw

The data imitate real embeddings: a few thousand gaussian clusters of uneven size on the unit sphere, with
the spread of CLIP image embeddings (cosine to the cluster centre ~0.75). On iid random unit vectors every
point is equally far from every other, and approximate indexes look broken for no real-world reason.
Queries are fresh points from the same distribution. Recall@10 is against exact search in the same run.
Timings are medians over repeats; the numpy matmul is the reference the others are compared with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clipforge.index import ann  # noqa: E402


def clustered(n: int, dim: int, clusters: int, seed: int, centres: np.ndarray | None = None) -> tuple:
    """(n, dim) unit vectors, and the centres, drawn in chunks to bound temporary memory."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5  # uneven sizes, as with real photo collections
    weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        c = rng.choice(clusters, m, p=weights)
        x = centres[c] + 0.9 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def numpy_topk(x: np.ndarray, q: np.ndarray, k: int, chunk: int = 262_144) -> np.ndarray:
    """Reference: q @ x.T then argpartition, over row chunks (fp16 chunks are upcast to fp32 first)."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for s in range(0, len(x), chunk):
        sc = q @ x[s : s + chunk].astype(np.float32, copy=False).T  # (Q, chunk)
        part = np.argpartition(-sc, k, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], 1)
        best_i = np.concatenate([best_i, part + s], 1)
        top = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in ms."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)]))


def index_bytes(index) -> float:
    import faiss

    return float(faiss.serialize_index(index).nbytes)


def bench_index(kind: str, x: np.ndarray, q: np.ndarray, k: int, row: Callable) -> None:
    """Build the collection's index of `kind` over x (N, D) and time it as the Collection would search it."""
    t = time.perf_counter()
    vi = ann.VectorIndex.build(kind, x.shape[1], x, np.arange(len(x), dtype=np.int64))
    build_s = time.perf_counter() - t
    per = index_bytes(vi.index) / len(x)
    q1 = q[:1]
    if kind != "ivfpq":
        name = (
            "faiss IndexFlatIP (exact, default)"
            if kind == "flat"
            else f"faiss HNSW M={ann.HNSW_M} ef={ann.HNSW_EF_SEARCH}"
        )
        row(name, build_s, per, lambda: vi.search(q1, k), lambda: vi.search(q, k), vi.search(q, k)[1])
        return
    name = f"faiss IVF{vi.index.nlist}-PQ{vi.index.pq.M} nprobe={ann.IVF_NPROBE}"
    row(
        name + " (PQ scores only)",
        build_s,
        per,
        lambda: vi.search(q1, k),
        lambda: vi.search(q, k),
        vi.search(q, k)[1],
    )
    fetch = lambda i: x[i]  # noqa: E731 - the re-rank source; the Collection reads these rows from SQLite
    row(
        name + f" + exact re-rank x{ann.IVF_RERANK}",
        build_s,
        per,
        lambda: vi.search(q1, k, None, fetch),
        lambda: vi.search(q, k, None, fetch),
        vi.search(q, k, None, fetch)[1],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--quick", action="store_true", help="100,000 vectors")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=0, help="default: n / 250, at least 400")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], help="rows to skip: numpy16 hnsw ivfpq")
    args = p.parse_args(argv)
    import faiss

    n = 100_000 if args.quick else args.n
    clusters = args.clusters or max(400, n // 250)
    k = 10
    t0 = time.perf_counter()
    x, centres = clustered(n, args.dim, clusters, seed=0)
    q, _ = clustered(100, args.dim, clusters, seed=1, centres=centres)  # (100, D) fresh queries
    q1 = q[:1]
    print(
        f"data: {n} x {args.dim}, {clusters} clusters, made in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    truth = numpy_topk(x, q, k)
    rows = []

    def row(name: str, build_s: float, bytes_per: float, single: Callable, batch: Callable, got: np.ndarray):
        r = (
            name,
            build_s,
            bytes_per,
            timed(single, args.repeats * 4),
            timed(batch, args.repeats),
            recall(got, truth),
        )
        rows.append(r)
        print(f"  {r[0]}: {r[3]:.2f} ms / {r[4]:.1f} ms, recall {r[5]:.3f}", file=sys.stderr)

    row(
        "numpy matmul fp32 (reference)",
        0.0,
        4 * args.dim,
        lambda: numpy_topk(x, q1, k),
        lambda: numpy_topk(x, q, k),
        truth,
    )
    if "numpy16" not in args.skip:
        x16 = x.astype(np.float16)
        got = numpy_topk(x16, q, k)
        row(
            "numpy matmul fp16 storage",
            0.0,
            2 * args.dim,
            lambda: numpy_topk(x16, q1, k),
            lambda: numpy_topk(x16, q, k),
            got,
        )
        del x16
    for kind in ("flat", "hnsw", "ivfpq"):
        if kind not in args.skip:
            bench_index(kind, x, q, k, row)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{n:,} vectors x {args.dim}-d, {clusters} clusters, k={k}, {faiss.omp_get_max_threads()} threads,"
        f" load average {load:.1f}, medians of {args.repeats * 4} single / {args.repeats} batch runs\n"
    )
    print("| method | build s | bytes / vector | 1 query ms | 100 queries ms | recall@10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, b, per, s1, s100, rec in rows:
        print(f"| {name} | {b:.1f} | {per:,.0f} | {s1:.2f} | {s100:.1f} | {rec:.3f} |")


if __name__ == "__main__":
    main()
