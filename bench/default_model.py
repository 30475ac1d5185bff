"""The default model's figures, as the mean and spread of several seeds, for a training recipe (a config under
configs/): held-out zero-shot accuracy for each built-in prompt set, text -> image and image -> text recall, and
the demo's six searches over the whole corpus (is the queried concept among the top 5?).

    python bench/default_model.py --config configs/default.json --seeds 0 1 2
    python bench/default_model.py --config configs/scratch.json --seeds 0 1 2

Each seed is one `clipforge train --config ... --seed S` into OUT/<config>-s<S> (a finished run is reused), then
evaluated on the corpus's held-out split, whose concepts no training image shows. Results go to
OUT/<config>.json and a Markdown table on stdout. Run it alone: two torch jobs on 2 cores slow each other down.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clipforge import paths
from clipforge.encoder import Encoder
from clipforge.eval.manifest import read_labelled_manifest
from clipforge.eval.retrieval import retrieval_eval
from clipforge.index import embed_output as eo
from clipforge.zeroshot import TEMPLATE_SETS, embed_classes, load_templates

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo import QUERIES, shows_concept  # noqa: E402  (the demo's searches and what counts as finding each)


def train(config: str, seed: int, run: Path) -> float:
    """Train one seed (unless its final model exists); returns the wall seconds it took."""
    if (run / "final" / "clipforge.json").exists():
        timed = run / "bench-train.json"
        return float(json.loads(timed.read_text())["seconds"]) if timed.exists() else float("nan")
    corpus = paths.corpus_dir()
    cmd = [
        sys.executable,
        "-m",
        "clipforge",
        "train",
        "--config",
        config,
        "--seed",
        str(seed),
        "--out",
        str(run),
    ]
    cmd += [
        "--data",
        str(corpus / "train.jsonl"),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    (run / "bench-train.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def class_weights(enc: Encoder, names: list[str], templates: str, cache: Path) -> np.ndarray:
    """(D, C) text classifier, kept on disk under a hash of the text tower, tokenizer, names and templates:
    recipes whose text tower does not train (the default's) share one classifier across seeds."""
    h = hashlib.sha256(json.dumps([names, load_templates(templates)]).encode())
    for k, v in sorted(enc.model.text.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    h.update(json.dumps(enc.tokenizer(["a probe, 123"]).tolist()).encode())
    path = cache / f"classes-{h.hexdigest()[:20]}.npy"
    if path.is_file():
        return np.load(path)
    w = embed_classes(enc, names, load_templates(templates))
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, w)
    return w


def zeroshot(enc: Encoder, manifest: Path, cache: Path) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 for every built-in template set, from one pass over the images."""
    rows = read_labelled_manifest(manifest, required=("image", "label"))
    names = sorted({str(r["label"]) for r in rows})
    index = {c: i for i, c in enumerate(names)}
    targets = np.array([index[str(r["label"])] for r in rows])
    feats = enc.embed_images([r["image"] for r in rows])
    out = {}
    for templates in TEMPLATE_SETS:
        top5 = np.argsort(-(feats @ class_weights(enc, names, templates, cache)), axis=1)[:, :5]
        out[templates] = {
            "top1": float(np.mean(top5[:, 0] == targets)),
            "top5": float(np.mean((top5 == targets[:, None]).any(axis=1))),
        }
    return out


def _finished(folder: Path) -> bool:
    """Every part of an embedding folder written (then nothing there needs writing again)."""
    try:
        return len(eo.done_parts(folder)) == eo.read_sidecar(folder)["parts"]
    except eo.EmbeddingFolderError:  # not written yet
        return False


def corpus_embeddings(enc: Encoder, run: Path) -> tuple[np.ndarray, list[dict]]:
    """The whole corpus's image vectors (N, D) and metadata rows (train and held-out images), written once to
    RUN/bench-corpus-embeddings; a locked image tower's outputs come from the feature cache when there."""
    import pyarrow.parquet as pq

    from clipforge.index.embed import embed_to_folder
    from clipforge.train.locked import CachedImageRows

    corpus, out = paths.corpus_dir(), run / "bench-corpus-embeddings"
    if not _finished(out):
        config = json.loads((run / "config.json").read_text())
        cached = None
        if config.get("lock_image") and config.get("feature_cache"):
            cache = config["feature_cache"]
            cached = CachedImageRows(paths.features_dir() if cache == "auto" else Path(cache), enc.model)
        embed_to_folder(
            [corpus / "train.jsonl", corpus / "heldout.jsonl"], enc, out, dtype="float32", cached=cached
        )
    vecs = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    meta = [r for p in sorted((out / "metadata").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    return vecs, meta


def demo_searches(enc: Encoder, run: Path) -> dict[str, bool]:
    """The demo's searches over the whole corpus (train and held-out images): queried concept in the top 5?"""
    vecs, meta = corpus_embeddings(enc, run)
    found = {}
    for query, words in QUERIES.items():
        top = np.argsort(-(vecs @ enc.embed_texts([query])[0]))[:5]
        found[query] = any(shows_concept(str(meta[i].get("concept") or ""), words) for i in top)
    return found


def evaluate(run: Path) -> dict:
    enc = Encoder.load(str(run / "final"))
    corpus = paths.corpus_dir()
    return {
        "zeroshot": zeroshot(enc, corpus / "heldout_zeroshot.jsonl", run.parent / "classifiers"),
        "retrieval": retrieval_eval(enc, corpus / "heldout_retrieval.jsonl"),
        "searches": demo_searches(enc, run),
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def table(name: str, results: list[dict]) -> str:
    rows = [f"| {name}: {len(results)} seeds | mean ± sd (min-max) |", "|---|---|"]
    for t in TEMPLATE_SETS:
        for k in ("top1", "top5"):
            rows.append(
                f"| zero-shot {k}, '{t}' templates, % | {spread([r['zeroshot'][t][k] for r in results])} |"
            )
    for k in ("text_to_image_R@1", "text_to_image_R@10", "image_to_text_R@1", "image_to_text_R@10"):
        rows.append(f"| {k}, % | {spread([r['retrieval'][k] for r in results])} |")
    found = [sum(r["searches"].values()) for r in results]
    rows.append(f"| demo searches with the concept in the top 5 (of 6) | {', '.join(map(str, found))} |")
    minutes = [r["train_seconds"] / 60 for r in results if r["train_seconds"] == r["train_seconds"]]
    rows.append(
        f"| training wall time incl. its held-out evaluation, min (median) | {statistics.median(minutes) if minutes else float('nan'):.1f} |"
    )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-default-model"))
    a = ap.parse_args()
    name = Path(a.config).stem
    results = []
    for seed in a.seeds:
        run = a.out / f"{name}-s{seed}"
        seconds = train(a.config, seed, run)
        done = run / "bench-eval.json"  # a finished seed's figures: a rerun with more seeds reuses them
        if not done.exists():
            done.write_text(json.dumps(evaluate(run)))
        r = {"seed": seed, "train_seconds": seconds, **json.loads(done.read_text())}
        results.append(r)
        print(json.dumps(r), flush=True)
    meta = {"config": a.config, "machine": f"{platform.machine()}, {platform.node()}", "results": results}
    (a.out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    print(table(name, results))


if __name__ == "__main__":
    main()
