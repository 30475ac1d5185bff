"""Texts longer than the context: text -> image recall of each `long` strategy (truncate, chunk, interpolate) on
long captions made by joining each held-out image's captions ("a clip art drawing of an eagle. eagle, clip
art. ...").

Images are embedded once; each strategy embeds the same long captions; recall counts a caption at K when its
own image is among the K images most similar to it (clipforge.eval.retrieval). Also reports how many long
captions exceed the model's context (where the strategies can differ at all) and each strategy's time.

    PYTHONPATH=src python bench/long_text.py MODEL [--manifest ~/.cache/clipforge/corpus/heldout_retrieval.jsonl]
        [--limit N] [--vocab PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, table  # noqa: E402

from clipforge.encoder import Encoder  # noqa: E402
from clipforge.eval.manifest import captions_of, read_labelled_manifest  # noqa: E402
from clipforge.eval.retrieval import recall_metrics  # noqa: E402
from clipforge.long_text import LONG_STRATEGIES  # noqa: E402

MANIFEST = Path("~/.cache/clipforge/corpus/heldout_retrieval.jsonl").expanduser()


def long_captions(manifest: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """(image paths, one long caption per image: its captions joined as sentences)."""
    rows = read_labelled_manifest(manifest, required=("image",))[:limit]
    return [r["image"] for r in rows], [". ".join(c.rstrip(". ") for c in captions_of(r)) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint (anything clipforge.load reads)")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--limit", type=int, default=None, help="first N images only")
    ap.add_argument("--vocab", default=None, help="vocabulary of a checkpoint that carries none")
    args = ap.parse_args()
    enc = Encoder.load(args.model, vocab=args.vocab)
    images, texts = long_captions(args.manifest, args.limit)
    lengths = [len(enc.tokenizer.encode(t)) + 2 for t in texts]  # with the start and end tokens
    ctx = enc.tokenizer.context_length
    print(f"machine: {machine()}; load average {load_average()}")
    print(
        f"{len(images)} images, one long caption each: median {statistics.median(lengths):.0f} tokens, "
        f"max {max(lengths)}, {np.mean(np.array(lengths) > ctx):.1%} past the context of {ctx}"
    )
    img = enc.embed_images(images)  # (N, D)
    owner = np.arange(len(images))
    rows = []
    for long in LONG_STRATEGIES:
        t0 = time.perf_counter()
        txt = enc.embed_texts(texts, long=long)  # (N, D)
        seconds = time.perf_counter() - t0
        m = recall_metrics(img @ txt.T, owner)
        rows.append([long] + [f"{m[f'text_to_image_R@{k}']:.1%}" for k in (1, 5, 10)] + [f"{seconds:.1f}"])
    print(table(["strategy", "text->image R@1", "R@5", "R@10", "text seconds"], rows))


if __name__ == "__main__":
    main()
