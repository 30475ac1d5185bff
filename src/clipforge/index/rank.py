"""Ranking a query against a collection: vector, keyword or hybrid, with a relevance estimate per hit.

Relevance (relevance.py). Each vector hit's relevance is a probability: how far its cosine stands out from
the query's scores against a sample of the collection, beyond what chance gives among N items, mapped
through the collection's calibration (fitted per model on held-out concepts by `clipforge index calibrate`,
else a fixed mapping chosen by hand).

The cut-off: none by default (Python, CLI, HTTP). DEFAULT_MIN_RELEVANCE (0.1) is only the suggested one,
measured with the default model's fitted calibration (bench/search_quality.py, BENCHMARKS.md): the largest
threshold keeping 90% of the relevant top-10 hits on the half of the held-out concepts that fits the
calibration. On the other half it keeps 96% of them but drops only 26% of the irrelevant ones (vector; 23%
hybrid), and 12% of nonsense queries return nothing: the model's relevant and irrelevant hits on unseen
concepts overlap too much (AUC 0.74) for one threshold to keep the first and drop most of the second, which
is what a default would have to promise.

Keywords. SQLite FTS5 ranks rows holding the query's words by BM25 (db.py). A keyword hit's relevance is the
share of the query's word weight the row holds, each word weighted by its inverse document frequency (so
"the" counts for little and a rare file-name token for much).

Hybrid fuses the vector and keyword rankings by reciprocal-rank fusion (each list contributes
1 / (RRF_K + rank), RRF_K = 60 as in Cormack et al. 2009); a hit's relevance is the higher of its two. The
keyword list fused holds only rows with at least KEYWORD_MATCH of the query's word weight and one of its
rarest words (highest IDF), and only those count as keyword evidence for relevance: rows sharing only common
or generic words ("img" of every camera file name, "clip art drawing" of captioned rows when the word that
names the thing is in no row) would otherwise ride their vector rank past the row that holds the rare word
the user typed, and bury the uncaptioned images the vectors found (measured on the open corpus's held-out
concepts with camera-like file names, BENCHMARKS.md: hybrid R@10 0.05 before, 0.23 with the word-weight rule
alone, 0.28 with both; vector 0.39; with file names that name the concept 0.83 before, 0.77 now).
Whatever the mode, a hit's `score` stays its cosine with the query vector when there is one (BM25 otherwise),
and hits come in rank order.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import keywords
from .relevance import Calibration, chance_excess
from .store import Store
from .types import Hit, QueryError

MODES = ("vector", "keyword", "hybrid")
SORTS = ("relevance", "date")
DEFAULT_MIN_RELEVANCE = 0.1  # the suggested cut-off, measured (see above); applied only when asked for
BACKGROUND = 2048  # sampled items the query's score distribution is estimated from
RRF_K = 60
FUSION_POOL = 100  # candidates each list contributes to hybrid fusion (at least k)
COMMON_SHARE = 0.5  # words in more than this share of the rows are not searched for (they still weigh in)
KEYWORD_MATCH = 0.5  # hybrid fuses keyword rows holding at least this share of the query's word weight


@dataclass(frozen=True)
class Ranking:
    """How to rank: mode (None: hybrid when the query has words and the collection a keyword index, else
    vector), the relevance cut-off (None: none, plain top k) and the order of the hits passing it."""

    mode: str | None = None
    min_relevance: float | None = None
    sort: str = "relevance"

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise QueryError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")
        m = self.min_relevance
        if m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
            raise QueryError(f"min_relevance must be a number in [0, 1], got {m!r}")


def background_sample(store: Store, allowed: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """(B, D) stored vectors drawn uniformly from `allowed` (or every row), B <= BACKGROUND."""
    pool = store.all_ids() if allowed is None else allowed
    if not len(pool):
        return np.zeros((0, store.dim), np.float32)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(pool, min(BACKGROUND, len(pool)), replace=False))
    return store.vectors(pick)


def vector_relevance(
    scores: np.ndarray, background: np.ndarray, n_items: int, calibration: Calibration
) -> np.ndarray:
    """Relevance (n,) in [0, 1] of cosines `scores` (n,) given the query's background scores (B,); NaN
    (no estimate) when the background has fewer than relevance.MIN_BACKGROUND items."""
    excess = chance_excess(scores, background, n_items)
    if excess is None:
        return np.full(len(scores), np.nan, np.float32)
    return calibration(excess)


def word_weights(store: Store, words: list[str]) -> tuple[dict[str, float], list[str]]:
    """Each query word's BM25 inverse document frequency in the collection, and the words worth searching
    for: a word in most rows (over COMMON_SHARE) ranks nothing and would have FTS5 score most rows."""
    counts, n_rows = store.word_counts(words)
    idf = {w: math.log((n_rows - c + 0.5) / (c + 0.5) + 1.0) for w, c in counts.items()}
    return idf, [w for w, c in counts.items() if c <= COMMON_SHARE * n_rows]


def held_words(store: Store, ids: np.ndarray) -> list[set[str]]:
    """The keyword index's words of each row, read once for both keyword_relevance and holds_rarest."""
    texts = store.keyword_texts(ids)
    return [set(texts.get(int(i), "").split()) for i in ids]


def keyword_relevance(idf: dict[str, float], held: list[set[str]]) -> np.ndarray:
    """IDF-weighted share (n,) of the query's words (`idf`: word_weights) each row holds."""
    total = sum(idf.values())
    if not total:
        return np.zeros(len(held), np.float32)
    return np.array([sum(v for w, v in idf.items() if w in h) / total for h in held], np.float32)


def holds_rarest(idf: dict[str, float], held: list[set[str]]) -> np.ndarray:
    """(n,) bool: each row holds one of the query's rarest words (highest IDF)."""
    if not idf:
        return np.zeros(len(held), bool)
    top = max(idf.values())
    rarest = {w for w, v in idf.items() if v >= top}
    return np.array([bool(rarest & h) for h in held], bool)


def _rrf(lists: Sequence[np.ndarray]) -> np.ndarray:
    """Ids ordered by reciprocal-rank fusion of the ranked id lists."""
    fused: dict[int, float] = {}
    for ids in lists:
        for r, i in enumerate(ids):
            fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (RRF_K + r + 1)
    return np.array(sorted(fused, key=lambda i: (-fused[i], i)), np.int64)


def choose_mode(store: Store, ranking: Ranking, q: np.ndarray | None, words: list[str]) -> str:
    mode = ranking.mode
    if mode is None:
        mode = "hybrid" if words and store.has_keywords() else "vector"
        return "keyword" if q is None else mode
    if mode != "vector" and not words:
        raise QueryError(f"mode {mode!r} needs query text (words to match)")
    if mode != "vector" and not store.has_keywords():
        raise QueryError(
            f"collection {store.path} has no keyword index yet (written by an older version): open it for "
            "writing once (e.g. `clipforge index add` with no new files) to build it"
        )
    if mode != "keyword" and q is None:
        raise QueryError(f"mode {mode!r} needs a query vector (text with encoder=, an image or a vector)")
    return mode


def _candidates(
    store: Store, q: np.ndarray | None, words: list[str], k: int, mode: str, allowed: np.ndarray | None
) -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """The top-k ids of the mode, and for keyword candidates id -> (BM25, keyword relevance)."""
    pool = k if mode == "vector" else max(k, FUSION_POOL)
    lists, matched = [], {}
    if mode != "keyword":
        _, vids = store.search_vectors(q[None], pool, allowed)
        lists.append(vids[0][vids[0] >= 0])
    if mode != "vector":
        kids, matched = keyword_rows(store, words, pool, mode, allowed)
        lists.append(kids)
    ids = lists[0] if len(lists) == 1 else _rrf(lists)
    return ids[:k], matched


def keyword_rows(
    store: Store, words: list[str], pool: int, mode: str, allowed: np.ndarray | None
) -> tuple[np.ndarray, dict[int, tuple[float, float]]]:
    """The keyword list of a "keyword" or "hybrid" search, best first, and id -> (BM25, keyword relevance):
    for hybrid, only the rows that count as keyword evidence (see the docstring)."""
    idf, searched = word_weights(store, words)
    # asked for keywords alone, the user gets even a common word's rows
    ks, kids = store.search_keywords(searched or (words if mode == "keyword" else []), pool, allowed)
    held = held_words(store, kids)
    rel = keyword_relevance(idf, held)
    matched = {int(i): (float(s), float(r)) for i, s, r in zip(kids, ks, rel)}
    if mode == "hybrid":  # fuse only the rows matching well (not all sharing "the")
        kids = kids[(rel >= KEYWORD_MATCH) & holds_rarest(idf, held)]
        matched = {i: matched[i] for i in kids.tolist()}
    return kids, matched


def rank(
    store: Store,
    q: np.ndarray | None,
    words: list[str],
    k: int,
    ranking: Ranking,
    allowed: np.ndarray | None,
    background: np.ndarray,
) -> list[Hit]:
    """Top-k hits of the query vector `q` (D,) and/or query `words`, among `allowed` (None: all rows),
    ranked, cut off and sorted as `ranking` says. `background`: (B, D) stored vectors (background_sample)."""
    mode = choose_mode(store, ranking, q, words)
    ids, matched = _candidates(store, q, words, k, mode, allowed)
    if not len(ids):
        return []
    rel = np.full(len(ids), np.nan, np.float32)
    if q is not None:
        scores = store.vectors(ids) @ q  # (n,) cosines, whatever list an id came from
        if mode != "keyword":
            n_items = len(store) if allowed is None else len(allowed)
            rel = vector_relevance(scores, background @ q, n_items, store.relevance)
    else:
        scores = np.array([matched[int(i)][0] for i in ids], np.float32)
    # A row matching the words is as relevant as the larger of its two estimates; matching none (in hybrid:
    # not fused) is no evidence either way.
    kw = np.array([matched.get(int(i), (0.0, np.nan))[1] for i in ids], np.float32)
    rel = np.fmax(rel, np.where(kw > 0, kw, np.nan))
    by_id = dict(zip(ids.tolist(), rel.tolist()))
    hits = store.hits(scores, ids)
    for h in hits:
        h.relevance = None if math.isnan(by_id[h.id]) else round(float(by_id[h.id]), 6)
    if ranking.min_relevance is not None:  # a hit without an estimate (a tiny collection) is kept
        hits = [h for h in hits if h.relevance is None or h.relevance >= ranking.min_relevance]
    if ranking.sort == "date":
        hits.sort(key=lambda h: -item_time(h))  # newest first; stable, so rank order breaks ties
    return hits


def item_time(hit: Hit) -> float:
    """When the photo was taken (metadata "taken_at", ISO 8601; local time when it has no offset), else
    when the item was added; as Unix time."""
    taken = hit.metadata.get("taken_at") if isinstance(hit.metadata, dict) else None
    if isinstance(taken, str):
        try:
            return dt.datetime.fromisoformat(taken).timestamp()
        except ValueError:
            pass
    return float(hit.added or 0.0)


def date_bound(value: str | float | int | dt.datetime | None, what: str) -> tuple[str, float] | None:
    """A date filter bound -> (ISO 8601 to compare with "taken_at" as written, Unix time to compare with
    "added"). Accepts ISO 8601 text, Unix seconds (number or digits) or a datetime."""
    if value is None:
        return None
    when: dt.datetime
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        when = dt.datetime.fromtimestamp(float(value))
    elif isinstance(value, str):
        try:
            when = dt.datetime.fromtimestamp(float(value))
        except ValueError:
            try:
                when = dt.datetime.fromisoformat(value.strip())
            except ValueError:
                raise QueryError(f"{what} {value!r} is neither a date (ISO 8601) nor Unix seconds") from None
    else:
        raise QueryError(f"{what} must be a date (ISO 8601 text, Unix seconds or a datetime), got {value!r}")
    local = when.replace(tzinfo=None) if when.tzinfo is None else when.astimezone().replace(tzinfo=None)
    return local.isoformat(timespec="seconds"), when.timestamp()


def query_words(
    text: str | Sequence[str] | None, ranking: Ranking = Ranking(), plain: bool = True
) -> list[str]:
    """The words to match. A query that is more than text (an image, a vector, negatives: `plain` False)
    ranks by vector alone unless a mode is asked for: what its words alone match is not what it asks."""
    if text is None or (ranking.mode is None and not plain):
        return []
    return keywords.tokens(" ".join([text] if isinstance(text, str) else list(text)))
