"""The main job (`make demo`): fetch the open corpus and the pretrained towers, train the default model (the
towers locked, their projections aligned on the corpus), evaluate it on held-out concepts, build a search
collection of the corpus, fit how relevance is read from its scores, run six searches and say for each
whether it found what it asked for, and serve the search page.

Every step is one `clipforge` command, printed before it runs, so the same steps can be typed by hand.
Steps whose output already exists are skipped; `--retrain` trains again. On 2 CPU cores: a few minutes to
fetch and render the corpus the first time; then most of the time goes to running the two towers once over
the corpus (their outputs are cached, so the collection is built from the cache) - see README.md for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

from clipforge import paths
from clipforge.cli import main as clipforge

RUN = Path("runs/default")
COLLECTION = Path("runs/default-collection")
EMBEDDINGS = Path("runs/default-embeddings")
# Each search, and the concept words that count as finding it: a hit is right when the corpus concept it was
# drawn for contains one of them as a whole word ("red apple", "apple core"; "racing car"; "grinning face").
QUERIES = {
    "a red apple": ("apple",),
    "a cat": ("cat", "kitten"),
    "a car": ("car", "automobile", "taxi", "convertible", "sedan"),
    "a smiling face": ("smiling", "smile", "grinning", "smiley"),
    "a flag": ("flag",),
    "a musical instrument": (
        "guitar",
        "bassoon",
        "oboe",
        "violin",
        "piano",
        "trumpet",
        "saxophone",
        "drum",
        "banjo",
        "accordion",
        "harp",
        "flute",
        "musical keyboard",
        "horn",
        "maracas",
        "cello",
        "clarinet",
        "trombone",
        "tuba",
        "xylophone",
        "lute",
        "ukulele",
        "harmonica",
        "bagpipes",
        "tambourine",
        "cymbal",
        "instrument",
    ),
}


def step(*args: str) -> None:
    print("\n$ clipforge " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    code = clipforge(list(args))
    if code:
        sys.exit(f"step failed with exit code {code}: clipforge {' '.join(args)}")


def shows_concept(concept: str, words: tuple[str, ...]) -> bool:
    """The demo's rule (also the benchmarks'): a hit is right when its corpus concept holds one of the query's
    words as a whole word."""
    return re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", concept) is not None


def check_search(collection: Path, query: str, words: tuple[str, ...]) -> bool:
    """Run one search and print its top 5 with each hit's concept, and whether the queried concept is among
    them, so a reader sees at once whether the model works."""
    # Vector search alone: the keyword half of the default hybrid mode would find captions that contain the
    # query's words, and this check is about whether the model knows the concept.
    args = ["search", str(collection), query, "--k", "5", "--mode", "vector", "--json"]
    print("\n$ clipforge " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = clipforge(args)
    if code:
        sys.exit(f"step failed with exit code {code}: clipforge {' '.join(args)}")
    hits = json.loads(out.getvalue())["hits"]
    found = 0
    for h in hits:
        concept = (h.get("metadata") or {}).get("concept") or "?"
        right = shows_concept(concept, words)
        found += right
        rel = h.get("relevance")
        rel = "  -  " if rel is None else f"{rel:.2f}"
        print(f"  {h['score']:.3f}  relevance {rel}  {'+' if right else '-'} {concept:<32}  {h['path']}")
    ok = found > 0
    print(
        f"  '{query}': {found} of the top {len(hits)} show the queried concept -> {'OK' if ok else 'MISSED'}"
    )
    return ok


def install_default(final: Path) -> None:
    """Copy the trained model to the cache directory that `--model default` resolves to, atomically."""
    target = paths.default_model_dir()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    print(f"installed the default model at {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retrain", action="store_true", help="train again even if a default model exists")
    ap.add_argument(
        "--no-serve", action="store_true", help="stop after the searches instead of serving the page"
    )
    ap.add_argument("--port", default="8000")
    args = ap.parse_args()

    corpus = paths.corpus_dir()
    step("data", "fetch", "--out", str(corpus))
    step("data", "fetch-towers")

    if args.retrain or not (paths.default_model_dir() / "clipforge.json").exists():
        for old in (RUN, EMBEDDINGS, COLLECTION):  # all made by the model being replaced
            shutil.rmtree(old, ignore_errors=True)
        step(
            "train",
            "--config",
            "configs/default.json",
            "--data",
            str(corpus / "train.jsonl"),
            "--out",
            str(RUN),
        )
        install_default(RUN / "final")
        step("plot", str(RUN))

    report = Path("runs/default-eval")
    step(
        "eval",
        "zeroshot",
        "--model",
        "default",
        "--manifest",
        str(corpus / "heldout_zeroshot.jsonl"),
        "--templates",
        "ensemble",
        "--out",
        str(report / "zeroshot"),
        "--json",
    )
    step(
        "eval",
        "retrieval",
        "--model",
        "default",
        "--manifest",
        str(corpus / "heldout_retrieval.jsonl"),
        "--out",
        str(report / "retrieval"),
        "--json",
    )
    classes = len({json.loads(line)["label"] for line in (corpus / "heldout_zeroshot.jsonl").open()})
    print(f"\nzero-shot chance level on the held-out concepts: top-1 {1 / classes:.4f} ({classes} classes)")

    # The whole corpus, so searches find concepts the model was trained on as well as held-out ones. Training
    # cached the locked image tower's outputs for the training images; `embed --feature-cache` reads them.
    step("embed", str(corpus / "train.jsonl"), str(corpus / "heldout.jsonl"), "--model", "default",
         "--out", str(EMBEDDINGS), "--feature-cache", "auto")  # fmt: skip
    if not COLLECTION.exists():
        step("index", "create", str(COLLECTION), "--model", "default")
    step("index", "add", str(COLLECTION), str(EMBEDDINGS))
    # How far a relevant hit stands out depends on the model, so its relevance estimate is fitted on searches
    # whose answers are known: the captions of half of the held-out concepts (the other half measures the fit,
    # bench/search_quality.py). --save-model keeps it with the model for collections created later.
    step("index", "calibrate", str(COLLECTION), str(corpus / "heldout_relevance.jsonl"), "--label", "concept",
         "--save-model")  # fmt: skip
    step("index", "info", str(COLLECTION), "--json")
    results = {q: check_search(COLLECTION, q, words) for q, words in QUERIES.items()}
    print(f"\nthe queried concept is in the top 5 for {sum(results.values())} of {len(results)} searches")

    if not args.no_serve and sys.stdin.isatty():
        print(f"\nOpen http://127.0.0.1:{args.port}/ to search the corpus (Ctrl-C stops the server).")
        step("serve", str(COLLECTION), "--port", args.port)


if __name__ == "__main__":
    main()
