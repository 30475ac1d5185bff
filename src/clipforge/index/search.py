"""Turning a request (texts, images, a vector, negatives) into one query vector, and results into hits.

A combined query is a weighted sum of unit vectors, not renormalised, so a hit's score reads directly as
    w_text * cos(x, text) + w_image * cos(x, image) + cos(x, vector) - negative_weight * cos(x, negative)
and a single-text query scores plain cosine similarity.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import db
from .types import EncoderLike, Hit, check_k

if TYPE_CHECKING:
    from .store import Collection


def unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def as_matrix(vectors: Any, dim: int, what: str = "vectors") -> np.ndarray:
    """Validate a (N, D) or (D,) array of finite numbers -> (N, D) float32."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must have shape (N, {dim}) or ({dim},), got {np.shape(vectors)}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{what} contain NaN or infinity (rows {bad[:10].tolist()})")
    return x


def _texts(value: str | Sequence[str], what: str) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ValueError(f"{what} is an empty list")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{what} must be non-empty strings, got {t!r}")
    return texts


def _images(value: Any) -> list[Any]:
    if isinstance(value, (str, Path, bytes)) or not isinstance(value, (list, tuple)):
        return [value]
    if not value:
        raise ValueError("image is an empty list")
    return list(value)


def _mean_unit(x: np.ndarray, dim: int, what: str) -> np.ndarray:
    x = as_matrix(x, dim, f"encoder output for {what}")
    return unit(x.mean(axis=0))  # several texts/images: the centroid direction (prompt ensembling)


def query_vector(
    dim: int,
    encoder: EncoderLike | None,
    text: str | Sequence[str] | None = None,
    image: Any = None,
    vector: np.ndarray | None = None,
    weights: tuple[float, float] = (1.0, 1.0),
    negative: str | Sequence[str] | None = None,
    negative_weight: float = 0.5,
) -> np.ndarray:
    """One query vector (D,) float32 from any mix of text, image and raw vector, minus the negatives."""
    if text is None and image is None and vector is None:
        raise ValueError("a query needs at least one of text=, image= or vector=")
    if len(weights) != 2:
        raise ValueError(f"weights must be (text_weight, image_weight), got {weights!r}")
    needs_encoder = text is not None or image is not None or negative is not None
    if needs_encoder and encoder is None:
        raise ValueError("text, image and negative queries need encoder=")
    q = np.zeros(dim, np.float32)
    if text is not None:
        texts = _texts(text, "text")
        q += float(weights[0]) * _mean_unit(encoder.embed_texts(texts), dim, f"text {texts[0]!r}")
    if image is not None:
        q += float(weights[1]) * _mean_unit(encoder.embed_images(_images(image)), dim, "image")
    if vector is not None:
        q += unit(as_matrix(vector, dim, "query vector")).mean(axis=0)
    if negative is not None:
        negs = _texts(negative, "negative")
        q -= float(negative_weight) * _mean_unit(encoder.embed_texts(negs), dim, f"negative {negs[0]!r}")
    return q.astype(np.float32)


def hit_from_row(row: tuple, score: float) -> Hit:
    id_, key, caption, sha, size, mtime, added, meta = row
    return Hit(int(id_), float(score), key, caption, json.loads(meta), sha, size, mtime, added)


def hits(conn: sqlite3.Connection, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    """One query's results (k,) -> hits, dropping padding (-1) and rows deleted since the index was read."""
    keep = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
    rows = db.rows_by_id(conn, [i for _, i in keep])
    return [hit_from_row(rows[i], s) for s, i in keep if i in rows]


def components(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (size >= 2) of the graph on 0..n-1 with edges `pairs` (E, 2); union-find."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in np.unique(pairs) if len(pairs) else []:
        groups.setdefault(root(int(i)), []).append(int(i))
    return [sorted(g) for g in groups.values() if len(g) > 1]


def dedup_groups(coll: Collection, threshold: float, neighbours: int) -> list[list[Hit]]:
    """See `Collection.dedup`. Each stored vector queries the index for its nearest `neighbours`."""
    pairs = []
    k = min(check_k(neighbours, "neighbours"), max(len(coll), 1))
    for ids, vecs in db.iter_vectors(coll.conn, coll.dim):
        s, nn = coll._search(vecs, k)  # (n, k)
        a, b = np.nonzero((s >= threshold) & (nn != ids[:, None]) & (nn >= 0))
        pairs.append(np.stack([ids[a], nn[a, b]], 1))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    uniq, inv = np.unique(edges, return_inverse=True)
    groups = []
    for comp in components(len(uniq), inv.reshape(-1, 2)):
        member_ids = uniq[comp]
        vecs = coll.vectors(member_ids)
        rows = db.rows_by_id(coll.conn, member_ids)
        groups.append([hit_from_row(rows[int(i)], float(v @ vecs[0])) for i, v in zip(member_ids, vecs)])
    return sorted(groups, key=lambda g: (-len(g), g[0].id))


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


def recall_at_k(coll: Collection, k: int, sample: int, seed: int) -> float:
    """Share of the exact top-k that the index returns, over up to `sample` stored vectors used as queries."""
    k, sample = check_k(k), check_k(sample, "sample")
    all_ids = db.all_ids(coll.conn)
    if not len(all_ids):
        return 1.0
    k = min(k, len(all_ids))
    rng = np.random.default_rng(seed)
    q = coll.vectors(np.sort(rng.choice(all_ids, min(sample, len(all_ids)), replace=False)))
    _, approx = coll._ann.search(q, k, None, coll.vectors)
    exact = exact_topk(coll.conn, coll.dim, q, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))
