"""The main job (`make demo`): fetch the open corpus, train the default model, evaluate it on held-out concepts,
build a search collection of the corpus, show a few searches, and serve the search page.

Every step is one `clipforge` command, printed before it runs, so the same steps can be typed by hand.
Steps whose output already exists are skipped; `--retrain` trains again. On 2 CPU cores: about 5 minutes to
fetch and render the corpus the first time, about 15 to train, under a minute for the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from clipforge import paths
from clipforge.cli import main as clipforge

RUN = Path("runs/default")
COLLECTION = Path("runs/default-collection")
QUERIES = ["a red apple", "a cat", "a car", "a smiling face", "a flag", "a musical instrument"]


def step(*args: str) -> None:
    print("\n$ clipforge " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    code = clipforge(list(args))
    if code:
        sys.exit(f"step failed with exit code {code}: clipforge {' '.join(args)}")


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
    ap.add_argument("--no-serve", action="store_true", help="stop after the searches instead of serving the page")
    ap.add_argument("--port", default="8000")
    args = ap.parse_args()

    corpus = paths.corpus_dir()
    step("data", "fetch", "--out", str(corpus))

    if args.retrain or not (paths.default_model_dir() / "clipforge.json").exists():
        shutil.rmtree(RUN, ignore_errors=True)
        step("train", "--config", "configs/default.json", "--data", str(corpus / "train.jsonl"),
             "--eval-data", str(corpus / "heldout.jsonl"), "--out", str(RUN))
        install_default(RUN / "final")
        step("plot", str(RUN))

    report = Path("runs/default-eval")
    step("eval", "zeroshot", "--model", "default", "--manifest", str(corpus / "heldout_zeroshot.jsonl"),
         "--templates", "ensemble", "--out", str(report / "zeroshot"), "--json")
    step("eval", "retrieval", "--model", "default", "--manifest", str(corpus / "heldout_retrieval.jsonl"),
         "--out", str(report / "retrieval"), "--json")
    classes = len({json.loads(line)["label"] for line in (corpus / "heldout_zeroshot.jsonl").open()})
    print(f"\nzero-shot chance level on the held-out concepts: top-1 {1 / classes:.4f} ({classes} classes)")

    if not COLLECTION.exists():
        step("index", "create", str(COLLECTION), "--model", "default")
    # The whole corpus, so searches find concepts the model was trained on as well as held-out ones.
    step("index", "add", str(COLLECTION), str(corpus / "train.jsonl"), str(corpus / "heldout.jsonl"))
    step("index", "info", str(COLLECTION), "--json")
    for q in QUERIES:
        step("search", str(COLLECTION), q, "--k", "5")

    if not args.no_serve and sys.stdin.isatty():
        print(f"\nOpen http://127.0.0.1:{args.port}/ to search the corpus (Ctrl-C stops the server).")
        step("serve", str(COLLECTION), "--port", args.port)


if __name__ == "__main__":
    main()
