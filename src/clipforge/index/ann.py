"""The FAISS side of a collection: exact and approximate inner-product indexes keyed by database ids.

Vectors are L2-normalised, so inner product is cosine similarity. The index is a derived structure: the
SQLite database holds every vector, and the index can always be rebuilt from it (see `store.py`).

Kinds:
- "flat": `IndexIDMap2(IndexFlatIP)`, exact.
- "hnsw": `IndexIDMap2(IndexHNSWFlat)`, graph search. HNSW cannot delete, so removed ids become tombstones
  excluded by an id selector at query time, and the graph is rebuilt once they pass a quarter of it.
- "ivfpq": `IndexIVFPQ` (stores the ids itself, deletes natively); its compressed scores only shortlist
  candidates, which are re-ranked exactly with vectors fetched from the database.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipforge.atomic import write_atomic

from .types import WriteError, check_k

KINDS = ("flat", "hnsw", "ivfpq", "auto")
EXACT_LIMIT = 200_000  # "auto" stays exact below this many vectors: a flat scan is still a few ms per query
HNSW_LIMIT = 5_000_000  # above this, HNSW's ~2.3 KB per 512-d vector gets heavy; "auto" moves to IVF-PQ
IVF_MIN_TRAIN = 10_000  # PQ needs ~40 points per centroid of its 256-entry codebooks to train sensibly

# Defaults tuned on clustered synthetic embeddings (bench/search.py) to reach recall@10 >= 0.95.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96
IVF_NPROBE = 32
IVF_RERANK = 20  # shortlist k * IVF_RERANK candidates by PQ score, then re-rank exactly

FetchVectors = Callable[[np.ndarray], np.ndarray]  # ids (n,) -> vectors (n, D), same order


def effective_kind(kind: str, n: int) -> str:
    """The index actually built for `n` vectors when `kind` was asked for."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "auto":
        if n < EXACT_LIMIT:
            return "flat"
        return "hnsw" if n < HNSW_LIMIT else "ivfpq"
    if kind == "ivfpq" and n < IVF_MIN_TRAIN:
        return "flat"  # too few vectors to train PQ; exact search is better and cheap at this size
    return kind


def _faiss():
    import faiss  # heavy optional dependency: the [index] extra

    return faiss


def _ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=np.int64)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class VectorIndex:
    """One FAISS index plus what it needs to search correctly (tombstones, re-ranking)."""

    def __init__(self, kind: str, dim: int, index, dead: set[int] | None = None) -> None:
        self.kind = kind
        self.dim = dim
        self.index = index
        self.dead: set[int] = dead or set()

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls, kind: str, dim: int, vectors: np.ndarray, ids: np.ndarray, n_total: int | None = None
    ) -> VectorIndex:
        """A fresh index of `kind` ("flat", "hnsw" or "ivfpq") holding vectors (N, D) under ids (N,).

        IVF-PQ trains on `vectors`; with no ids they are only a training sample of the `n_total` vectors
        to be added later in chunks (which sets the number of lists)."""
        faiss = _faiss()
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            index = faiss.IndexIDMap2(inner)
        elif kind == "ivfpq":
            index = _train_ivfpq(dim, _f32(vectors), n_total or len(vectors))
        else:
            raise ValueError(f"cannot build index kind {kind!r}")
        out = cls(kind, dim, index)
        out.add(vectors, ids)
        return out

    @classmethod
    def load(cls, path: Path, kind: str, dim: int) -> VectorIndex:
        index = _faiss().read_index(str(path))
        if index.d != dim:
            raise ValueError(f"index file {path} has dimension {index.d}, collection has {dim}")
        return cls(kind, dim, index)

    def save(self, path: Path) -> None:
        """Write atomically (clipforge.atomic): a crash leaves old or new, never half; a failure, no temp file."""
        data = _faiss().serialize_index(self.index)  # uint8 array
        write_atomic(path, lambda f: f.write(data.data), error=WriteError)

    # ---- contents -----------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        return int(self.index.ntotal) - len(self.dead)

    def stored_ids(self) -> np.ndarray:
        """Every id physically in the index, tombstoned or not. (M,) int64."""
        faiss = _faiss()
        if self.kind == "ivfpq":
            inv = self.index.invlists
            parts = [
                faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                for i in range(self.index.nlist)
                if inv.list_size(i)
            ]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def live_ids(self) -> np.ndarray:
        ids = self.stored_ids()
        if self.dead:
            ids = ids[~np.isin(ids, np.fromiter(self.dead, np.int64))]
        return ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(_f32(vectors), _ids(ids))

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.dead.update(int(i) for i in ids)
            if len(self.dead) * 4 > self.index.ntotal:
                self._compact_hnsw()
            return
        self.index.remove_ids(_faiss().IDSelectorBatch(_ids(ids)))

    def _compact_hnsw(self) -> None:
        faiss = _faiss()
        storage = faiss.downcast_index(faiss.downcast_index(self.index.index).storage)
        vecs = faiss.vector_to_array(storage.codes).view(np.float32).reshape(-1, self.dim)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        keep = ~np.isin(ids, np.fromiter(self.dead, np.int64))
        fresh = VectorIndex.build("hnsw", self.dim, vecs[keep], ids[keep])
        self.index, self.dead = fresh.index, set()

    # ---- search -------------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        fetch: FetchVectors | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. queries (Q, D) -> scores (Q, k') float32, ids (Q, k') int64 (-1 = none),
        where k' = min(k, vectors that can match): k never sizes an allocation beyond what is stored.

        `allowed` restricts results to those ids; `fetch` gives exact vectors for IVF-PQ re-ranking.
        """
        faiss = _faiss()
        q = _f32(queries)
        k = min(check_k(k), self.ntotal, len(allowed) if allowed is not None else self.ntotal)
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        sel = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(_ids(allowed))
        elif self.dead:
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(_ids(np.fromiter(self.dead, np.int64))))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(HNSW_EF_SEARCH, k))
            return self.index.search(q, k, params=params)
        if self.kind == "ivfpq":
            kk = min(k * IVF_RERANK, max(int(self.index.ntotal), 1))
            params = faiss.SearchParametersIVF(sel=sel, nprobe=IVF_NPROBE)
            _, cand = self.index.search(q, kk, params=params)
            return rerank(q, cand, k, fetch) if fetch is not None else self.index.search(q, k, params=params)
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return self.index.search(q, k, params=params)


def rerank(q: np.ndarray, cand: np.ndarray, k: int, fetch: FetchVectors) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for shortlisted candidates (Q, C) and the best k of each row."""
    valid = np.unique(cand[cand >= 0])
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    if not len(valid):
        return scores, ids
    vecs = fetch(valid)  # (U, D)
    row_of = {int(i): r for r, i in enumerate(valid)}
    for qi in range(len(q)):
        c = cand[qi][cand[qi] >= 0]
        s = vecs[[row_of[int(i)] for i in c]] @ q[qi]  # (C,)
        order = np.argsort(-s, kind="stable")[:k]
        scores[qi, : len(order)], ids[qi, : len(order)] = s[order], c[order]
    return scores, ids


def ivf_lists(n_total: int, n_train: int) -> int:
    """Inverted lists for `n_total` vectors trained on `n_train`: ~4 sqrt(N), >= 39 training points each."""
    nlist = int(np.clip(4 * np.sqrt(n_total), 16, 65536))
    return min(nlist, max(16, n_train // 39))  # k-means wants >= 39 points per centroid


def _train_ivfpq(dim: int, vectors: np.ndarray, n_total: int):
    faiss = _faiss()
    n = len(vectors)
    nlist = ivf_lists(n_total, n)
    m = next(
        m for m in (dim // 8, dim // 4, dim // 2, dim) if m and dim % m == 0
    )  # ~8 dims per sub-quantiser
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = vectors if n <= 256 * nlist else vectors[rng.choice(n, 256 * nlist, replace=False)]
    index.train(sample)
    return index
