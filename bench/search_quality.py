"""Search quality of a collection on held-out pairs: text->image R@10 and nDCG@10 in vector, keyword and
hybrid modes, the relevance cut-off's precision and recall, and what the keyword index (FTS5) costs in add.

    python bench/search_quality.py COLLECTION HELDOUT.jsonl [--model M] [--images FOLDER]

HELDOUT.jsonl holds one held-out pair a line, {"image": path, "caption": text} (or "captions": [...], the first
is used; relative paths are relative to the manifest), whose images are stored in COLLECTION. Each caption is
a query and its own image the one relevant item, so R@10 is the share of queries whose image is in the top 10
(image rows only) and nDCG@10 = 1 / log2(1 + rank) averaged (0 past rank 10). Store the images WITHOUT these
captions (a folder add, or a manifest without them), or keyword search finds each image by its own caption:
the script reports the share of targets whose stored caption is the query ("caption leak").

The cut-off: at rank.DEFAULT_MIN_RELEVANCE, precision = relevant hits kept / hits kept, recall = share of
queries whose image is kept; and the share of nonsense queries (random letter strings) that return nothing.
FTS5 cost: rows/s of committing the collection's own vectors and records into a fresh collection with and
without the keyword index (alternating rounds, medians), and with --images the same for `Collection.add` of
an image folder, model included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from clipforge.index import Collection, db  # noqa: E402
from clipforge.index.files import normalise  # noqa: E402
from clipforge.index.rank import DEFAULT_MIN_RELEVANCE  # noqa: E402

MODES = ("vector", "keyword", "hybrid")


def read_pairs(manifest: Path) -> list[tuple[str, str]]:
    """(normalised image path, caption) of each line."""
    pairs = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        caption = row.get("caption") or (row.get("captions") or [None])[0]
        if caption:
            pairs.append((normalise(manifest.parent / row["image"]), str(caption)))
    return pairs


def rank_of(paths: list[str | None], target: str) -> int | None:
    return next((r for r, p in enumerate(paths, start=1) if p == target), None)


def retrieval(coll: Collection, pairs: list[tuple[str, str]], encoder, k: int = 10) -> dict:
    """R@k and nDCG@k per mode, over the pairs whose image is stored."""
    out: dict = {}
    for mode in MODES:
        ranks = []
        for path, caption in pairs:
            hits = coll.search(text=caption, encoder=encoder, k=k, mode=mode, modality="image")
            ranks.append(rank_of([h.path for h in hits], path))
        out[mode] = {
            f"R@{k}": float(np.mean([r is not None for r in ranks])),
            f"nDCG@{k}": float(np.mean([1 / math.log2(1 + r) if r else 0.0 for r in ranks])),
        }
    return out


def cut_off(
    coll: Collection, pairs: list[tuple[str, str]], encoder, k: int, nonsense: int, seed: int
) -> dict:
    """Precision and recall of the default relevance cut-off (hybrid, the default mode), and the share of
    nonsense queries answered with nothing."""
    kept = found = 0
    for path, caption in pairs:
        hits = coll.search(
            text=caption, encoder=encoder, k=k, min_relevance=DEFAULT_MIN_RELEVANCE, modality="image"
        )
        kept += len(hits)
        found += any(h.path == path for h in hits)  # one relevant item per query
    rng = random.Random(seed)
    words = [
        " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9)))
            for _ in range(rng.randint(1, 3))
        )
        for _ in range(nonsense)
    ]
    empty = [
        not coll.search(text=w, encoder=encoder, k=k, min_relevance=DEFAULT_MIN_RELEVANCE) for w in words
    ]
    return {
        "min_relevance": DEFAULT_MIN_RELEVANCE,
        "precision": found / kept if kept else None,  # None: nothing was kept
        "recall": found / len(pairs) if pairs else None,
        "nonsense_empty": float(np.mean(empty)) if empty else None,
    }


@contextlib.contextmanager
def keywords_disabled() -> Iterator[None]:
    """Commits that write no keyword entries (the empty table stays): what a collection cost before it."""
    saved = db._insert_keywords
    db._insert_keywords = lambda *a, **kw: None
    try:
        yield
    finally:
        db._insert_keywords = saved


def _rows(coll: Collection, limit: int) -> tuple[np.ndarray, list[dict]]:
    ids = coll.all_ids()[:limit]
    hits = coll.hits(np.zeros(len(ids)), ids)
    records = [
        {"key": h.path or f"caption-{h.id}", "caption": h.caption, "metadata": h.metadata} for h in hits
    ]
    return coll.vectors(np.array([h.id for h in hits])), records


def fts_cost(coll: Collection, rounds: int, limit: int, images: Path | None, encoder) -> dict:
    """Rows/s committing `limit` of the collection's rows (batches of 256), and images/s of adding `images`,
    with and without the keyword index, in alternating rounds."""
    vecs, records = _rows(coll, limit)
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
                    n_images = len(c.add([images], encoder).added)
                    times["add without" if off else "add with FTS5"].append(time.perf_counter() - t)
                    c.close()
    out = {}
    for name, ts in times.items():
        n = len(records) if name.startswith("commit") else n_images
        out[name + (" (rows/s)" if name.startswith("commit") else " (images/s)")] = n / float(np.median(ts))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("collection")
    p.add_argument(
        "heldout", help="JSONL of held-out {image, caption} pairs whose images are in the collection"
    )
    p.add_argument("--model", default=None, help="checkpoint (default: the collection's model)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nonsense", type=int, default=100, help="nonsense queries for the cut-off")
    p.add_argument("--max-pairs", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the FTS5 cost")
    p.add_argument("--rows", type=int, default=20_000, help="rows committed per FTS5 cost round")
    p.add_argument("--images", type=Path, default=None, help="an image folder to time `add` with and without")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from clipforge.cli.index import collection_encoder

    with Collection.open(a.collection) as coll:
        enc = collection_encoder(coll, a.model, None, "cpu")
        ids = coll.all_ids()
        stored = {h.path: h.caption for h in coll.hits(np.zeros(len(ids)), ids)}
        pairs = [(p_, c) for p_, c in read_pairs(Path(a.heldout)) if p_ in stored]
        random.Random(a.seed).shuffle(pairs)
        pairs = pairs[: a.max_pairs]
        result = {
            "collection": str(a.collection),
            "pairs": len(pairs),
            "caption_leak": float(np.mean([stored[p_] == c for p_, c in pairs])) if pairs else 0.0,
            "retrieval": retrieval(coll, pairs, enc, a.k),
            "cut_off": cut_off(coll, pairs, enc, a.k, a.nonsense, a.seed),
            "fts5_cost": fts_cost(coll, a.rounds, a.rows, a.images, enc),
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
