"""Hybrid search's fusion rule against alternatives, on the open corpus's held-out concepts.

    python bench/hybrid_fusion.py [--run runs/bench-v3/default-s0]

Same collection, queries and relevance as bench/search_quality.py (whose docstring has the protocol), once with
camera-like names for the held-out files and once with the corpus's (which name the concept). For each query:
the vector top FUSION_POOL, and the keyword rows hybrid fuses (rank.py: half of the query's word weight and one
of its rarest words). Rules compared, R@10 on the dev and test halves of the held-out concepts:
- rrf w: reciprocal-rank fusion with the keyword list weighted w (w = 1 is what rank.py does);
- noisy-or c: candidates ordered by 1 - (1 - p_vec)(1 - c * keyword relevance), p_vec the hit's calibrated
  vector relevance (the calibration fitted on the dev half, as `index calibrate` would);
- excess + b: candidates ordered by the vector chance excess plus b x keyword relevance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_quality as sq  # noqa: E402  (the collection, the queries and what counts as relevant)

from clipforge import paths  # noqa: E402
from clipforge.data.corpus import fits_relevance  # noqa: E402
from clipforge.index import rank, relevance  # noqa: E402
from clipforge.index.files import normalise  # noqa: E402

K = 10


def candidates(coll, q: np.ndarray, text: str, background: np.ndarray) -> dict:
    """The query's vector list, fused keyword rows with their keyword relevance, and every candidate's excess."""
    words = rank.query_words(text, rank.Ranking("hybrid"))
    _, vids = coll.search_vectors(q[None], rank.FUSION_POOL)
    vids = vids[0][vids[0] >= 0]
    kids, matched = rank.keyword_rows(coll, words, rank.FUSION_POOL, "hybrid", None)  # what hybrid fuses
    ids = np.unique(np.concatenate([vids, kids]).astype(np.int64))
    excess = relevance.chance_excess(coll.vectors(ids) @ q, background @ q, len(coll))
    return {
        "vector": vids.tolist(),
        "keyword": {i: r for i, (_, r) in matched.items()},
        "excess": dict(zip(ids.tolist(), excess.tolist())),
    }


def shown(coll, ids: list[int]) -> list:
    """The stored rows of `ids` (their paths tell their concepts)."""
    ids = list(dict.fromkeys(ids))
    return coll.hits(np.zeros(len(ids), np.float32), np.array(ids, np.int64))


def weighted_rrf(lists: list[list[int]], weights: list[float]) -> list[int]:
    fused: dict[int, float] = {}
    for ids, w in zip(lists, weights):
        for r, i in enumerate(ids):
            fused[i] = fused.get(i, 0.0) + w / (rank.RRF_K + r + 1)
    return sorted(fused, key=lambda i: (-fused[i], i))


def rules(c: dict, cal: relevance.Calibration) -> dict[str, list[int]]:
    kw, ex = c["keyword"], c["excess"]
    pool = set(c["vector"]) | set(kw)
    p = {i: float(cal(np.array([ex[i]]))[0]) for i in pool}
    out = {"vector alone": c["vector"][:K]}
    for w in (1.0, 0.5, 0.25):
        out[f"rrf w {w}"] = weighted_rrf([c["vector"], list(kw)], [1.0, w])[:K]
    for k in (0.2, 0.4, 0.6):
        s = {i: 1 - (1 - p[i]) * (1 - k * kw.get(i, 0.0)) for i in pool}
        out[f"noisy-or c {k}"] = sorted(s, key=lambda i: (-s[i], i))[:K]
    for b in (0.5, 1.0, 2.0):
        s = {i: ex[i] + b * kw.get(i, 0.0) for i in pool}
        out[f"excess + {b}"] = sorted(s, key=lambda i: (-s[i], i))[:K]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/bench-v3/default-s0"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from clipforge.encoder import Encoder

    enc = Encoder.load(str(a.run / "final"))
    corpus = paths.corpus_dir()
    held_rows = sq.read_manifest(corpus / "heldout.jsonl")
    heldout = {normalise(corpus / r["image"]) for r in held_rows}
    vecs, meta = sq.corpus_rows(a.run, enc)
    queries = sq.sample_queries(held_rows, len(held_rows), random.Random(a.seed))
    split_seed = json.loads((corpus / "corpus.json").read_text())["config"]["seed"]
    halves = ["dev" if fits_relevance(c, split_seed) else "test" for _, c in queries]
    vectors = enc.embed_texts([t for t, _ in queries])
    identity = json.loads((a.run / "bench-corpus-embeddings" / "embeddings.json").read_text())["model"]
    rows = []
    for names in ("opaque", "corpus"):
        with tempfile.TemporaryDirectory() as tmp:
            coll, concept_of = sq.build_collection(
                Path(tmp) / "c", identity, vecs, meta, heldout, names == "opaque"
            )
            background = rank.background_sample(coll, None)
            found: dict[str, dict[str, list[bool]]] = {}
            cands = [candidates(coll, q, t, background) for (t, _), q in zip(queries, vectors)]
            # the calibration `index calibrate` would fit on the dev half, as bench/search_quality.py does
            dev = [(c, concept) for c, (_, concept), h in zip(cands, queries, halves) if h == "dev"]
            x = np.concatenate([[c["excess"][i] for i in c["vector"][:K]] for c, _ in dev])
            y = [
                concept_of.get(h.path or "") == concept
                for c, concept in dev
                for h in shown(coll, c["vector"][:K])
            ]
            cal = relevance.fit(x, np.array(y))
            for c, (_, concept), half in zip(cands, queries, halves):
                tops = rules(c, cal)
                hits = {
                    h.id: concept_of.get(h.path or "") == concept for h in shown(coll, sum(tops.values(), []))
                }
                for name, top in tops.items():
                    found.setdefault(name, {"dev": [], "test": []})[half].append(any(hits[i] for i in top))
            coll.close()
        for name, by in found.items():
            rows.append((names, name, np.mean(by["dev"]), np.mean(by["test"])))
    print("| held-out file names | rule | R@10 dev | R@10 test |\n|---|---|---|---|")
    for names, name, d, t in rows:
        print(f"| {names} | {name} | {d:.3f} | {t:.3f} |")


if __name__ == "__main__":
    main()
