"""How closely an approximate index follows exact search: recall@k on queries that are not stored vectors.

A stored vector used as a query finds itself at distance zero, which HNSW and IVF-PQ reach almost always, so
self-queries flatter them (HNSW measured 1.0 on stored vectors, 0.94 on fresh ones). Real queries (a text, a
new photo) lie near stored vectors but on none of them: each query here is a stored vector drawn at random
plus Gaussian noise of half its norm (cosine ~0.9 to its source), renormalised.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import numpy as np

from . import db
from .arrays import unit
from .types import check_k

NOISE = 0.5
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # queries (Q, D), k -> scores, ids


def exact_topk(conn: sqlite3.Connection, dim: int, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids (Q, k) over every stored vector, streaming the database a chunk at a time."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for ids, vecs in db.iter_vectors(conn, dim):
        s = np.concatenate([best_s, q @ vecs.T], 1)  # (Q, k + n)
        i = np.concatenate([best_i, np.broadcast_to(ids, (len(q), len(ids)))], 1)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def fresh_queries(stored: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, D) unit queries: random stored (unit) vectors plus noise of norm ~NOISE."""
    a = stored[rng.integers(0, len(stored), n)]
    noise = rng.standard_normal(a.shape).astype(np.float32) * (NOISE / np.sqrt(a.shape[1]))
    return unit(a + noise).astype(np.float32)


def recall_at_k(
    conn: sqlite3.Connection,
    dim: int,
    search: SearchFn,
    fetch: Callable[[np.ndarray], np.ndarray],
    *,
    k: int,
    sample: int,
    seed: int,
) -> float:
    """Share of the exact top-k that `search` returns, over `sample` fresh queries (see the module)."""
    k, sample = check_k(k), check_k(sample, "sample")
    all_ids = db.all_ids(conn)
    if not len(all_ids):
        return 1.0
    k = min(k, len(all_ids))
    rng = np.random.default_rng(seed)
    stored = fetch(np.sort(rng.choice(all_ids, min(sample, len(all_ids)), replace=False)))
    q = fresh_queries(stored, sample, rng)
    _, approx = search(q, k)
    exact = exact_topk(conn, dim, q, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
