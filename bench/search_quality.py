"""Search quality on the open corpus's held-out concepts: text->image R@10 and nDCG@10 per mode (vector, keyword,
hybrid), how well the relevance estimate is calibrated, the relevance cut-off's precision and recall over a
few thresholds, how often nonsense queries return nothing, and what the keyword index (FTS5) costs in add.

    python bench/search_quality.py [--run runs/bench-default-model/default-s0] [--out FILE.json]

The collection holds the whole corpus (train and held-out images, 19,190 rows with the default corpus), built
from the run's corpus embeddings (bench/default_model.py writes them; made here from the feature cache if
missing). Training images keep their first caption; held-out images are stored with no caption and no
concept (their file names stay, as a photo library's would), so keyword search cannot find a held-out image
by its own caption.

Queries: one caption drawn at random for each held-out image (duplicates dropped). A hit is RELEVANT when the
corpus concept its image was drawn for equals the query caption's concept (the corpus manifests' "concept";
held-out concepts are never seen in training, so no training image is relevant to a held-out query). R@10 is
the share of queries with a relevant hit in the top 10; nDCG@10 uses binary gains, the ideal ranking putting
min(relevant items, 10) relevant hits first.

The held-out concepts are split in two halves by the corpus's own rule (clipforge.data.corpus.fits_relevance,
the half `heldout_relevance.jsonl` holds): the DEV half fits the relevance calibration exactly as `clipforge
index calibrate` does (relevance.fit on the chance excess of each query's vector top-K, relevant = same
concept) and chooses the cut-off (the largest threshold of THRESHOLDS keeping at least TARGET_RECALL of the
relevant top-10 hits in vector and in hybrid mode); the TEST half reports both. Calibration is compared by
log-loss and Brier score on the test half: the fitted one (what the demo ships), the fixed hand-set mapping
(relevance.FIXED), the dev half's base rate, and logistic and isotonic fits on training-side caption->image
pairs (2,000 training captions searched the same way) and an isotonic fit on the dev half.
Nonsense: random letter strings and salads of random caption
words. FTS5 cost: rows/s committing the collection's rows into a fresh collection with and without the keyword
index (alternating rounds, medians).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo import QUERIES, shows_concept  # noqa: E402  (the demo's six searches and what counts as finding each)

from clipforge import paths  # noqa: E402
from clipforge.data.corpus import fits_relevance  # noqa: E402
from clipforge.index import Collection, db, rank, relevance  # noqa: E402
from clipforge.index.files import normalise  # noqa: E402

MODES = ("vector", "keyword", "hybrid")
THRESHOLDS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
TARGET_RECALL = 0.9
K = 10


@dataclass
class Query:
    text: str
    concept: str
    vector: np.ndarray
    hits: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)  # mode -> (relevance, relevant)
    excess: np.ndarray | None = None  # vector top-k: relevance.chance_excess


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sample_queries(rows: list[dict], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(caption, concept): one random caption of each of up to n rows, no caption twice."""
    rows = rows[:]
    rng.shuffle(rows)
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(rng.choice(r["captions"]), r["concept"])
        if len(out) >= n:
            break
    return list(out.items())


def corpus_rows(run: Path, enc) -> tuple[np.ndarray, list[dict]]:
    """The run's corpus embeddings (N, D) and metadata rows, made (from the feature cache) when missing."""
    from default_model import corpus_embeddings

    return corpus_embeddings(enc, run)


def build_collection(
    where: Path, identity: dict, vecs: np.ndarray, meta: list[dict], heldout: set[str], opaque: bool
) -> tuple[Collection, dict[str, str]]:
    """The corpus as a collection, held-out rows without caption; with `opaque`, held-out files are stored
    under camera-like names (IMG_<random n>.png) instead of the corpus's, which name the concept. Returns
    it and each stored path's concept."""
    coll = Collection.create(where, identity=identity, dim=vecs.shape[1])
    numbers = np.random.default_rng(0).permutation(len(meta))
    records, concept_of = [], {}
    for m, n in zip(meta, numbers):
        path = normalise(m["image_path"])
        held = path in heldout
        if held and opaque:
            path = normalise(where.parent / "photos" / f"IMG_{n:05d}.png")
        concept_of[path] = m["concept"]
        records.append(
            {"path": path, "caption": None if held else m["caption"], "metadata": {"source": m["source"]}}
        )
    for s in range(0, len(records), 4096):
        coll.add_vectors(vecs[s : s + 4096], records[s : s + 4096])
    return coll, concept_of


def run_queries(
    coll: Collection, queries: list[Query], concept_of: dict[str, str], modes: tuple[str, ...]
) -> None:
    """Each query's top-K hits per mode with relevance (no cut-off), and its vector top-K's chance excess."""
    background = rank.background_sample(coll, None)
    for q in queries:
        for mode in modes:
            ranking = rank.Ranking(mode)
            vec = None if mode == "keyword" else q.vector
            hits = coll.rank(vec, rank.query_words(q.text, ranking), k=K, ranking=ranking)
            q.hits[mode] = [(h.relevance, concept_of.get(h.path or "") == q.concept) for h in hits]
            if mode == "vector":
                ids = np.array([h.id for h in hits])
                q.excess = relevance.chance_excess(
                    coll.vectors(ids) @ q.vector, background @ q.vector, len(coll)
                )


def retrieval(queries: list[Query], n_relevant: dict[str, int], mode: str) -> dict[str, float]:
    recall, ndcg = [], []
    for q in queries:
        rel = [r for _, r in q.hits[mode]]
        recall.append(any(rel))
        ideal = sum(1 / math.log2(r + 2) for r in range(min(n_relevant[q.concept], K)))
        ndcg.append(sum(1 / math.log2(r + 2) for r, x in enumerate(rel) if x) / ideal)
    return {f"R@{K}": float(np.mean(recall)), f"nDCG@{K}": float(np.mean(ndcg))}


def cut(queries: list[Query], mode: str, t: float) -> dict[str, float]:
    """The cut-off at t over the queries' top-K: precision and recall of the relevant hits kept, share of
    irrelevant hits dropped, share of queries left with nothing."""
    kept_rel = kept = rel = irr_dropped = irr = empty = 0
    for q in queries:
        keep = [(r is None or r >= t, x) for r, x in q.hits[mode]]
        kept += sum(k for k, _ in keep)
        kept_rel += sum(k and x for k, x in keep)
        rel += sum(x for _, x in keep)
        irr += sum(not x for _, x in keep)
        irr_dropped += sum(not k and not x for k, x in keep)
        empty += not any(k for k, _ in keep)
    return {
        "precision": kept_rel / kept if kept else float("nan"),
        "recall": kept_rel / rel if rel else float("nan"),
        "irrelevant_dropped": irr_dropped / irr if irr else float("nan"),
        "empty_queries": empty / len(queries),
    }


def xy(qs: list[Query]) -> tuple[np.ndarray, np.ndarray]:
    """The queries' vector top-K hits: chance excess and whether relevant."""
    return np.concatenate([q.excess for q in qs]), np.array([r for q in qs for _, r in q.hits["vector"]])


def calibration(
    fitted: relevance.Calibration, train: list[Query], dev: list[Query], test: list[Query]
) -> dict[str, dict[str, float]]:
    """Log-loss and Brier score on the test half's vector top-K of the fitted, the fixed and other mappings."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    xt, yt = xy(test)
    preds = {
        "fitted on the dev half (shipped)": fitted(xt),
        "fixed (hand-set)": relevance.FIXED(xt),
        "base rate of dev": np.full(len(yt), xy(dev)[1].mean()),
    }
    x, y = xy(train)
    preds["logistic fit on training-side"] = (
        LogisticRegression(C=1e6).fit(x[:, None], y).predict_proba(xt[:, None])[:, 1]
    )
    for name, qs in (("training-side", train), ("dev half", dev)):
        x, y = xy(qs)
        iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(x, y)
        preds[f"isotonic fit on {name}"] = iso.predict(xt)
    out = {}
    for name, p in preds.items():
        p = np.clip(p, 1e-4, 1 - 1e-4)
        out[name] = {"log_loss": log_loss(yt, p), "brier": brier_score_loss(yt, p), "mean": float(p.mean())}
    out["test base rate"] = {"mean": float(yt.mean()), "auc_of_excess": roc_auc_score(yt, xt)}
    out["fitted"] = {"margin": fitted.margin, "scale": fitted.scale}
    return out


def nonsense_texts(n: int, vocabulary: list[str], rng: random.Random) -> list[str]:
    """n/2 random letter strings ("qzkvw mxoeplr") and n/2 salads of 3-5 random caption words."""
    letters = [
        " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(n // 2)
    ]
    return letters + [" ".join(rng.sample(vocabulary, rng.randint(3, 5))) for _ in range(n - n // 2)]


def demo_found(
    coll: Collection, enc, mode: str, concept_of: dict[str, str]
) -> dict[str, list[tuple[float | None, bool]]]:
    """The demo's six searches: each top-5 hit's relevance and whether its concept is what was asked."""
    out = {}
    for text, words in QUERIES.items():
        hits = coll.search(text=text, encoder=enc, k=5, mode=mode)
        out[text] = [(h.relevance, shows_concept(concept_of.get(h.path or "", ""), words)) for h in hits]
    return out


@contextlib.contextmanager
def keywords_disabled() -> Iterator[None]:
    """Commits that write no keyword entries (the empty table stays): what a collection cost before it."""
    saved = db._insert_keywords
    db._insert_keywords = lambda *a, **kw: None
    try:
        yield
    finally:
        db._insert_keywords = saved


def fts_cost(coll: Collection, rounds: int, limit: int, images: Path | None, encoder) -> dict[str, float]:
    """Rows/s committing `limit` of the collection's rows (batches of 256), and with `images` images/s of
    `Collection.add` of that folder (model included), with and without the keyword index, in alternating
    rounds; medians."""
    ids = coll.all_ids()[:limit]
    hits = coll.hits(np.zeros(len(ids)), ids)
    records = [{"path": h.path, "caption": h.caption, "metadata": h.metadata} for h in hits]
    vecs = coll.vectors(np.array([h.id for h in hits]))
    times: dict[str, list[float]] = {"commit with FTS5": [], "commit without": []}
    if images is not None:
        times.update({"add with FTS5": [], "add without": []})
    n_images = 0
    for _ in range(rounds):
        for off in (False, True):
            with (
                tempfile.TemporaryDirectory() as tmp,
                keywords_disabled() if off else contextlib.nullcontext(),
            ):
                c = Collection.create(Path(tmp) / "c", identity=coll.identity, dim=coll.dim)
                t = time.perf_counter()
                for s in range(0, len(records), 256):
                    c.add_vectors(vecs[s : s + 256], records[s : s + 256])
                times["commit without" if off else "commit with FTS5"].append(time.perf_counter() - t)
                c.close()
                if images is not None:  # a second fresh collection: the rows above may name the same files
                    c = Collection.create(Path(tmp) / "a", identity=coll.identity, dim=coll.dim)
                    t = time.perf_counter()
                    n_images = len(c.add([images], encoder, workers=0).added)
                    times["add without" if off else "add with FTS5"].append(time.perf_counter() - t)
                    c.close()
    out = {}
    for name, ts in times.items():
        unit, n = (" (rows/s)", len(records)) if name.startswith("commit") else (" (images/s)", n_images)
        out[name + unit] = n / float(np.median(ts))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/bench-default-model/default-s0"))
    p.add_argument("--train-queries", type=int, default=2000)
    p.add_argument("--nonsense", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the FTS5 cost (0: skip it)")
    p.add_argument("--images", type=Path, default=None, help="an image folder to time `add` with and without")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--names",
        choices=["opaque", "corpus"],
        default="opaque",
        help="held-out files stored under camera-like names (opaque) or the corpus's, which name the concept",
    )
    p.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    a = p.parse_args(argv)
    from clipforge.encoder import Encoder

    enc = Encoder.load(str(a.run / "final"))
    corpus, rng = paths.corpus_dir(), random.Random(a.seed)
    train_rows, held_rows = read_manifest(corpus / "train.jsonl"), read_manifest(corpus / "heldout.jsonl")
    heldout = {normalise(corpus / r["image"]) for r in held_rows}
    n_relevant: dict[str, int] = {}
    for r in train_rows + held_rows:
        n_relevant[r["concept"]] = n_relevant.get(r["concept"], 0) + 1

    vecs, meta = corpus_rows(a.run, enc)
    held_q = sample_queries(held_rows, len(held_rows), rng)
    train_q = sample_queries(train_rows, a.train_queries, rng)
    seed = json.loads((corpus / "corpus.json").read_text())["config"]["seed"]
    vocabulary = sorted({w for r in train_rows for c in r["captions"] for w in re.findall(r"[a-z]{3,}", c)})
    junk = nonsense_texts(a.nonsense, vocabulary, rng)
    texts = [t for t, _ in held_q + train_q] + junk
    t0 = time.perf_counter()
    qv = enc.embed_texts(texts)
    print(f"embedded {len(texts)} queries in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    queries = [Query(t, c, v) for (t, c), v in zip(held_q + train_q + [(j, "") for j in junk], qv)]
    held, train, junk_q = (
        queries[: len(held_q)],
        queries[len(held_q) : len(held_q) + len(train_q)],
        queries[len(held_q) + len(train_q) :],
    )
    dev = [q for q in held if fits_relevance(q.concept, seed)]
    test = [q for q in held if not fits_relevance(q.concept, seed)]

    with tempfile.TemporaryDirectory() as tmp:
        identity = json.loads((a.run / "bench-corpus-embeddings" / "embeddings.json").read_text())["model"]
        opaque = a.names == "opaque"
        coll, concept_of = build_collection(Path(tmp) / "corpus", identity, vecs, meta, heldout, opaque)
        t0 = time.perf_counter()
        run_queries(coll, dev, concept_of, ("vector",))
        fitted = relevance.fit(*xy(dev))  # what `clipforge index calibrate` fits on these hits
        coll.set_relevance(fitted)
        run_queries(coll, held + junk_q, concept_of, MODES)
        run_queries(coll, train, concept_of, ("vector",))
        print(f"searched in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        demo = {m: demo_found(coll, enc, m, concept_of) for m in ("vector", "hybrid")}
        cost = fts_cost(coll, a.rounds, len(coll), a.images, enc) if a.rounds else {}
        n_rows = len(coll)
        coll.close()

    dev_cut = {m: {t: cut(dev, m, t)["recall"] for t in THRESHOLDS} for m in ("vector", "hybrid")}
    default = max(
        (t for t in THRESHOLDS if min(d[t] for d in dev_cut.values()) >= TARGET_RECALL), default=None
    )
    result = {
        "machine": f"{platform.machine()}, {platform.node()}",
        "load": os.getloadavg(),
        "rows": n_rows,
        "names": a.names,
        "queries": {"heldout": len(held), "dev": len(dev), "test": len(test), "train": len(train)},
        "retrieval": {m: retrieval(held, n_relevant, m) for m in MODES},
        "calibration": calibration(fitted, train, dev, test),
        "dev_recall": dev_cut,
        "chosen_default": default,
        "suggested_in_rank_py": rank.DEFAULT_MIN_RELEVANCE,
        "curve": {
            m: {
                t: {**cut(test, m, t), "nonsense_empty": cut(junk_q, m, t)["empty_queries"]}
                for t in (0.0,) + THRESHOLDS
            }
            for m in MODES
        },
        "nonsense_examples": junk[:3] + junk[-3:],
        "demo": {
            m: {
                t: {q: any(r is None or r >= t for r, ok in hs if ok) for q, hs in d.items()}
                for t in THRESHOLDS
            }
            for m, d in demo.items()
        },
        "demo_hits": demo,
        "fts5_cost": cost,
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    print(table(result))
    return result


def table(r: dict) -> str:
    """The figures as Markdown, for BENCHMARKS.md."""
    rows = ["| mode | R@10 | nDCG@10 |", "|---|---|---|"]
    rows += [f"| {m} | {v['R@10']:.3f} | {v['nDCG@10']:.3f} |" for m, v in r["retrieval"].items()]
    rows += ["", "| calibration of the vector relevance | log-loss | Brier | mean |", "|---|---|---|---|"]
    rows += [
        f"| {n} | {v['log_loss']:.3f} | {v['brier']:.3f} | {v['mean']:.3f} |"
        for n, v in r["calibration"].items()
        if "log_loss" in v
    ]
    rows += [
        "",
        "| min_relevance | mode | precision | recall | irrelevant dropped | queries empty | nonsense empty | demo found |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in ("vector", "hybrid"):
        for t, v in r["curve"][m].items():
            demo = sum(r["demo"][m][t].values()) if t in r["demo"][m] else 6
            rows.append(
                f"| {t} | {m} | {v['precision']:.3f} | {v['recall']:.3f} | {v['irrelevant_dropped']:.3f} | "
                f"{v['empty_queries']:.3f} | {v['nonsense_empty']:.3f} | {demo}/6 |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
