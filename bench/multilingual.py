"""Text->image recall per language on the corpus's held-out concepts (issue 14: queries in other languages).

    python bench/multilingual.py --model MODEL [--model MODEL2 ...] [--corpus DIR] [--locales fr ja ...]

Protocol:
- Queries: for each emoji whose concept the corpus holds out (the same concept split as the corpus:
  clipforge.data.parallel), its CLDR label in each emojibase locale: one query per (locale, concept). The
  English row uses the English CLDR label the same way.
- Gallery: every held-out image of the corpus (heldout.jsonl: emoji from Noto, Twemoji and Fluent, clip art,
  game icons), so a query must beat unrelated held-out images too. Targets of a query: the held-out images of
  its concept (several emoji sets and skin tones each), matched on the normalised concept.
- R@10: share of queries with at least one target among the 10 most similar images (cosine).
- Every model runs the same queries and gallery; image vectors are reused between models whose image towers
  have the same weights. "vs en" divides a row by the same model's English row; "vs teacher en" divides it by
  the first model's English row (pass the English-only model first): issue 14's goal is every language at
  >= 0.70 of the English figure, English within 1 point of the English-only model.
- With --by-seen, each model's R@10 again, split by whether every word of the query (runs of letters, marks and
  digits; ja and zh per character) occurs in the same locale's training phrases (for English, also in the
  captions a student reads): a word outside them is one the student never read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import load_average, machine, table  # noqa: E402

from clipforge import paths  # noqa: E402
from clipforge.data import captions as cap  # noqa: E402
from clipforge.data import parallel  # noqa: E402
from clipforge.encoder import Encoder  # noqa: E402
from clipforge.multilingual import DistillConfig, english_captions  # noqa: E402

K = 10


def gallery(corpus: Path) -> tuple[list[str], list[str]]:
    """(image paths, normalised concept of each) of the corpus's held-out split."""
    rows = [json.loads(line) for line in open(corpus / "heldout.jsonl", encoding="utf-8")]
    return [str(corpus / r["image"]) for r in rows], [cap.normalise_concept(r["concept"]) for r in rows]


def queries(corpus: Path, locales: list[str] | None) -> dict[str, list[tuple[str, str]]]:
    """locale -> [(label, normalised concept)] for the held-out emoji labels, one per concept."""
    pkg = parallel.emojibase_package(corpus)
    _, held = parallel.split_phrases(parallel.emoji_phrases(pkg, locales), *parallel.corpus_split(corpus))
    out: dict[str, dict[str, str]] = {}
    for p in held:
        if p.kind == "label":
            out.setdefault(p.locale, {}).setdefault(cap.normalise_concept(p.concept), p.text)
    return {loc: [(text, c) for c, text in by.items()] for loc, by in sorted(out.items())}


def hits_at_k(text: np.ndarray, images: np.ndarray, targets: list[np.ndarray]) -> np.ndarray:
    """(Q,) bool: a target among the K nearest images of each query."""
    top = np.argsort(-(text @ images.T), axis=1)[:, :K]  # (Q, K)
    return np.array([np.isin(t, row).any() for t, row in zip(targets, top)])


PER_CHARACTER = ("ja", "zh")  # written without spaces between words; their characters recur across words


def words(text: str, locale: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text.lower())
    keep = "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in text)
    return list(keep.replace(" ", "")) if locale.split("-")[0] in PER_CHARACTER else keep.split()


def seen_words(corpus: Path) -> dict[str, set[str]]:
    """locale -> every word of its training phrases (English: and of the captions a student reads)."""
    pkg = parallel.emojibase_package(corpus)
    train, _ = parallel.split_phrases(parallel.emoji_phrases(pkg), *parallel.corpus_split(corpus))
    out: dict[str, set[str]] = {}
    for p in train:
        out.setdefault(p.locale, set()).update(words(p.text, p.locale))
    cfg = DistillConfig()
    captions = {w for c in english_captions(corpus, cfg.english_captions, cfg.seed) for w in words(c, "en")}
    return {loc: ws | captions if loc.split("-")[0] == parallel.ENGLISH else ws for loc, ws in out.items()}


def tower_key(enc: Encoder) -> str:
    h = hashlib.sha256(json.dumps(enc.model.config.preprocess.__dict__, sort_keys=True).encode())
    for name, t in sorted(enc.model.visual.state_dict().items()):
        h.update(name.encode() + t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(models: list[str], corpus: Path, locales: list[str] | None) -> tuple[list[str], dict, dict]:
    images, concepts = gallery(corpus)
    by_concept: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by_concept.setdefault(c, []).append(i)
    qs = {loc: [q for q in rows if q[1] in by_concept] for loc, rows in queries(corpus, locales).items()}
    results: dict[str, dict[str, np.ndarray]] = {}
    image_vectors: dict[str, np.ndarray] = {}
    for m in models:
        enc = Encoder.load(m, batch_size=64)
        key = tower_key(enc)
        if key not in image_vectors:
            image_vectors[key] = enc.embed_images(images)
        results[m] = {
            loc: hits_at_k(
                enc.embed_texts([t for t, _ in rows]),
                image_vectors[key],
                [np.array(by_concept[c]) for _, c in rows],
            )
            for loc, rows in qs.items()
        }
    return [f"{loc} ({len(rows)})" for loc, rows in qs.items()], results, qs


def group_of(locale: str) -> str:
    lang = locale.split("-")[0]
    if lang == parallel.ENGLISH:
        return "English"
    return "ja, zh" if lang in PER_CHARACTER else "written with spaces"


def by_seen(models: list[str], corpus: Path, qs: dict, hits: dict) -> None:
    """Each model's R@K on queries whose every word its locale's training text holds, and on the others,
    pooled over the locales written with spaces, over ja and zh, and over English."""
    seen = seen_words(corpus)
    groups: dict[str, list[str]] = {}
    for loc in qs:
        if loc != "th":  # Thai writes no spaces between words: its "word" would be the whole label
            groups.setdefault(group_of(loc), []).append(loc)
    rows = []
    for group, locs in groups.items():
        known = np.concatenate([[set(words(t, loc)) <= seen[loc] for t, _ in qs[loc]] for loc in locs])
        row: list[object] = [group, f"{known.mean():.2f}"]
        for m in models:
            h = np.concatenate([hits[m][loc] for loc in locs])
            row += [f"{100 * h[known].mean():.1f}", f"{100 * h[~known].mean():.1f}"]
        rows.append(row)
    header = ["locales", "share all words seen"]
    for i in range(len(models)):
        header += [f"R@{K} seen [{i}]", f"R@{K} unseen [{i}]"]
    print(table(header, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", action="append", required=True, help="model directory; the English-only one first"
    )
    ap.add_argument("--corpus", default=None, help="corpus folder (default: the cache's)")
    ap.add_argument("--locales", nargs="*", default=None, help="locales to query (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--by-seen", action="store_true", help="also split R@10 by words seen in training")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    corpus = Path(a.corpus) if a.corpus else paths.corpus_dir()
    t0 = time.perf_counter()
    labels, hits, qs = run(a.model, corpus, a.locales)
    results = {m: {loc: float(h.mean()) for loc, h in by.items()} for m, by in hits.items()}
    first = results[a.model[0]]
    header = ["locale (queries)"]
    for i in range(len(a.model)):
        header += [f"R@{K} [{i}]", f"vs en [{i}]"] + ([f"vs teacher en [{i}]"] if i else [])
    rows = []
    for label, loc in zip(labels, first):
        row: list[object] = [label]
        for i, m in enumerate(a.model):
            r, en = results[m][loc], results[m].get("en", float("nan"))
            row += [f"{100 * r:.1f}", f"{r / en:.2f}" if en else "-"]
            row += [f"{r / first['en']:.2f}" if first.get("en") else "-"] if i else []
        rows.append(row)
    print(table(header, rows))
    for i, m in enumerate(a.model):
        others = [r / results[m]["en"] for loc, r in results[m].items() if loc not in ("en", "en-gb")]
        worst = min(others) if others else float("nan")
        med = statistics.median(others) if others else float("nan")
        print(f"[{i}] {m}: median ratio to its English {med:.2f}, lowest {worst:.2f}")
    if a.by_seen:
        by_seen(a.model, corpus, qs, hits)
    print(f"machine: {machine()}; load: {load_average()}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
