"""Near-duplicates in a collection: pairs above a cosine threshold among each item's nearest neighbours."""

from __future__ import annotations

import numpy as np

from .store import Store
from .types import Hit, check_k


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


def dedup_groups(store: Store, threshold: float, neighbours: int) -> list[list[Hit]]:
    """See `Collection.dedup`. Each stored vector queries the index for its nearest `neighbours`."""
    pairs = []
    k = min(check_k(neighbours, "neighbours"), max(len(store), 1))
    for ids, vecs in store.iter_vectors():
        s, nn = store.search_vectors(vecs, k)  # (n, k)
        a, b = np.nonzero((s >= threshold) & (nn != ids[:, None]) & (nn >= 0))
        pairs.append(np.stack([ids[a], nn[a, b]], 1))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    uniq, inv = np.unique(edges, return_inverse=True)
    groups = []
    for comp in components(len(uniq), inv.reshape(-1, 2)):
        member_ids = uniq[comp]
        vecs = store.vectors(member_ids)
        hits = store.hits(vecs @ vecs[0], member_ids)
        groups.append(hits)
    return sorted(groups, key=lambda g: (-len(g), g[0].id))
