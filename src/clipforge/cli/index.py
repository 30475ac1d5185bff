"""Search sub-commands: `index create|add|sync|remove|info|calibrate|build-ivfpq`, `search`, `dedup`, `embed`.

Commands that need the model load the one the collection records, unless --model names another path to the
same weights; a different model is refused (ModelMismatchError, a one-line error)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from clipforge.cli.common import add_json_flag, emit


def _model_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    help_ = "checkpoint directory or 'default'" + ("" if required else " (default: the collection's model)")
    p.add_argument("--model", "-m", required=required, default=None, help=help_)
    p.add_argument("--vocab", default=None, help="vocabulary for a checkpoint that carries none")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _pipeline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: cores - 1)")
    p.add_argument(
        "--exact-decode",
        action="store_true",
        help="decode JPEGs at full size (default: DCT-scaled draft decode)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--video-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds between a video's sampled frames (default 5); given to `index add` or `sync`, a "
        "stored video sampled at other moments is sampled again",
    )
    p.add_argument(
        "--video-max-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames per video at most; a longer video's frames are spread over it (default 120)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index", help="persistent search collections: create, add, sync, remove, info, calibrate, build-ivfpq"
    )
    acts = p.add_subparsers(dest="index_action", metavar="ACTION")
    _register_index(acts)
    _register_search(sub)
    _register_embed(sub)


def _register_index(acts: argparse._SubParsersAction) -> None:
    c = acts.add_parser("create", help="a new empty collection bound to a model")
    c.add_argument("collection")
    _model_flags(c, required=True)
    c.add_argument("--index", choices=["auto", "flat", "hnsw", "ivfpq"], default="auto", help="index kind")
    add_json_flag(c)
    c.set_defaults(run=lambda a: create(Path(a.collection), a.model, a.vocab, a.device, a.index, a.json))

    d = acts.add_parser("add", help="add folders, files, manifests, shards or `clipforge embed` folders")
    d.add_argument("collection")
    d.add_argument("paths", nargs="*", help="inputs to add")
    d.add_argument("--texts", default=None, help="a file of captions, one per line (image-to-text search)")
    _model_flags(d)
    _pipeline_flags(d)
    add_json_flag(d)
    d.set_defaults(
        run=lambda a: add(
            Path(a.collection),
            a.paths,
            a.texts,
            a.model,
            a.vocab,
            a.device,
            _pipeline(a),
            a.json,
        )
    )

    y = acts.add_parser(
        "sync", help="make a folder's rows match it: add new and changed files, remove gone ones"
    )
    y.add_argument("collection")
    y.add_argument("folder")
    _model_flags(y)
    _pipeline_flags(y)
    add_json_flag(y)
    y.set_defaults(
        run=lambda a: sync(
            Path(a.collection),
            Path(a.folder),
            a.model,
            a.vocab,
            a.device,
            _pipeline(a),
            a.json,
        )
    )

    r = acts.add_parser("remove", help="remove files, folders (everything under them) or ids")
    r.add_argument("collection")
    r.add_argument("paths", nargs="+")
    add_json_flag(r)
    r.set_defaults(run=lambda a: remove(Path(a.collection), a.paths, a.json))

    i = acts.add_parser("info", help="vectors, rows, model, index kind and (approximate indexes) recall@10")
    i.add_argument("collection")
    add_json_flag(i)
    i.set_defaults(run=lambda a: info(Path(a.collection), a.json))

    k = acts.add_parser(
        "calibrate",
        help="fit how relevance is read from scores, on searches whose relevant items are known",
        description="Fit the collection's relevance calibration: each caption of QUERIES (JSONL rows with "
        "'caption' or 'captions' and a label field) is searched, and each top-k hit counts as relevant when "
        "its metadata carries the query's label. Without QUERIES, copy the model's relevance.json.",
    )
    k.add_argument("collection")
    k.add_argument("queries", nargs="?", default=None, help="JSONL of labelled captions (see above)")
    k.add_argument("--label", default="concept", help="the field naming a row's concept (default: concept)")
    # the defaults of index/calibrate.py (K, MAX_QUERIES), written out: importing it here would load the index
    # stack (FAISS) at every command's start-up
    k.add_argument("--k", type=int, default=10, help="hits per query that are labelled (default 10)")
    k.add_argument("--max-queries", type=int, default=2000, help="captions searched at most (default 2000)")
    k.add_argument(
        "--save-model",
        action="store_true",
        help="also store the fit in the model's folder (relevance.json), for collections created later",
    )
    _model_flags(k)
    add_json_flag(k)
    k.set_defaults(run=calibrate)

    b = acts.add_parser("build-ivfpq", help="a new IVF-PQ collection from an embedding folder, in chunks")
    b.add_argument("embeddings", help="folder written by `clipforge embed`")
    b.add_argument("--out", required=True, help="the collection to create")
    add_json_flag(b)
    b.set_defaults(run=lambda a: build_ivfpq(Path(a.embeddings), Path(a.out), a.json))


def _register_search(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("search", help="text, image or combined queries against a collection")
    s.add_argument("collection")
    s.add_argument("query", nargs="?", default=None, help='text; words starting with "-" are negatives')
    s.add_argument("--image", action="append", default=None, help="query image (repeatable)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--text-weight", type=float, default=1.0)
    s.add_argument("--image-weight", type=float, default=1.0)
    s.add_argument("--negative", action="append", default=[], help="text to steer away from (repeatable)")
    s.add_argument("--negative-weight", type=float, default=0.5)
    s.add_argument("--path-prefix", default=None, help="only items whose path starts with this")
    s.add_argument(
        "--after",
        default=None,
        help="only items dated after this (ISO 8601 or epoch seconds); an item's date is when it was taken "
        "(metadata taken_at), else when it was added",
    )
    s.add_argument("--before", default=None, help="only items dated before this")
    s.add_argument("--camera", default=None, help='only items whose camera ("Make Model") contains this')
    s.add_argument(
        "--mode",
        choices=["vector", "keyword", "hybrid"],
        default=None,
        help="vector (CLIP), keyword (file names, captions, metadata; BM25) or hybrid (default when the query "
        "has words and the collection a keyword index)",
    )
    s.add_argument(
        "--min-relevance",
        type=float,
        default=None,
        help="drop hits whose relevance estimate (the probability, 0-1, that a hit is relevant) is below this, "
        "so fewer than k may come back (default: none, the plain top k). Try 0.1: with the default model it "
        "kept 96%% of the relevant top-10 hits on unseen concepts and dropped a quarter of the irrelevant ones; "
        "see BENCHMARKS.md",
    )
    s.add_argument(
        "--sort",
        choices=["relevance", "date"],
        default="relevance",
        help="order of the hits kept (date: newest first)",
    )
    s.add_argument(
        "--modality",
        choices=["image", "text"],
        default=None,
        help="only items with an image, or only captions (image-to-text search)",
    )
    _model_flags(s)
    add_json_flag(s)
    s.set_defaults(run=lambda a: search(Path(a.collection), a, a.json))

    d = sub.add_parser("dedup", help="groups of duplicates: same file, same photo, similar shots")
    d.add_argument("collection")
    d.add_argument("--threshold", type=float, default=None, help="cosine at or above which shots are similar")
    d.add_argument("--photo-hamming", type=int, default=None, help="hash bits (of 63) within: same photo")
    d.add_argument("--photo-cosine", type=float, default=None, help="cosine at or above: same photo")
    add_json_flag(d)
    d.set_defaults(
        run=lambda a: dedup(Path(a.collection), a.threshold, a.photo_hamming, a.photo_cosine, a.json)
    )


def _register_embed(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "embed", help="embed folders, manifests, shards or videos into clip-retrieval's output layout"
    )
    e.add_argument(
        "inputs",
        nargs="+",
        help="folders (their images and videos), manifests (.jsonl/.csv), webdataset shards (.tar), videos",
    )
    _model_flags(e, required=True)
    e.add_argument("--out", required=True, help="output folder (img_emb/, text_emb/, metadata/)")
    e.add_argument("--part-size", type=int, default=100_000, help="vectors per output part (default 100000)")
    e.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    e.add_argument(
        "--feature-cache",
        default=None,
        help="read images whose locked-tower features `clipforge train` cached from this folder ('auto': the "
        "default cache) instead of running the image tower on them",
    )
    _pipeline_flags(e)
    e.add_argument("--ray", action="store_true", help="run on Ray Data (RAY_ADDRESS or a local instance)")
    e.add_argument("--ray-actors", type=int, default=None, help="model actors (default: one per GPU, else 1)")
    add_json_flag(e)
    e.set_defaults(run=lambda a: embed(a))


# ---- plain functions -------------------------------------------------------------------------------------


def _load_encoder(model: str, vocab: str | None, device: str):
    from clipforge.encoder import Encoder

    p = Path(model).expanduser()
    return Encoder.load(str(p.absolute()) if p.exists() else model, vocab=vocab, device=device)


def collection_encoder(coll, model: str | None, vocab: str | None, device: str):
    """The collection's own model, or `model` if it is the same one (else ModelMismatchError)."""
    recorded = coll.identity.get("model")
    if model is None and not recorded:
        raise ValueError(f"collection {coll.path} records no model path; pass --model")
    if model is not None:
        enc = _load_encoder(model, vocab, device)
    else:
        try:
            enc = _load_encoder(recorded, vocab, device)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"collection {coll.path} records model {recorded}, which cannot be loaded ({e}); pass --model"
            ) from e
    coll.check_encoder(enc)
    return enc


def create(path: Path, model: str, vocab: str | None, device: str, index: str, as_json: bool) -> int:
    from clipforge.index import Collection

    enc = _load_encoder(model, vocab, device)
    with Collection.create_for(path, enc, index=index) as coll:
        out = coll.info()
        fitted = coll.relevance.fitted is not None
    how = "the model's relevance calibration" if fitted else "the fixed relevance mapping"
    emit(out, as_json, f"created {path} for {enc.name} ({enc.dim}-d, index {index}, {how})")
    return 0


def calibrate(a: argparse.Namespace) -> int:
    from clipforge.index import Collection
    from clipforge.index.calibrate import model_calibration, read_queries, write_model_file

    if a.k < 1 or a.max_queries < 1:
        raise ValueError("--k and --max-queries must be at least 1")
    with Collection.open(Path(a.collection)) as coll:
        enc = collection_encoder(coll, a.model, a.vocab, a.device)
        if a.queries is None:
            cal = model_calibration(enc)
            if cal is None:
                raise ValueError(
                    f"{enc.name} has no relevance.json for these weights: pass QUERIES to fit one"
                )
            coll.set_relevance(cal)
            emit(cal.to_dict(), a.json, f"{a.collection}: relevance calibration copied from {enc.name}")
            return 0
        queries = read_queries(Path(a.queries), a.label, a.max_queries)
        report = coll.calibrate(queries, enc, label=a.label, k=a.k)
        cal = coll.relevance
    if a.save_model:
        report["model_file"] = str(write_model_file(enc, cal))
    text = (
        f"{a.collection}: relevance = sigmoid((excess - {cal.margin:.3f}) / {cal.scale:.3f}), fitted on "
        f"{report['hits']} hits of {report['queries']} queries ({report['relevant_share']:.0%} relevant); "
        f"log-loss {report['log_loss_fit']:.3f} (before: {report['log_loss_before']:.3f}, same hits)"
    )
    emit(report, a.json, text + (f"\n  stored in {report['model_file']}" if a.save_model else ""))
    return 0


def _pipeline(a: argparse.Namespace):
    from clipforge.index.ingest import Pipeline

    progress = not a.quiet and sys.stderr.isatty()
    return Pipeline(a.batch_size, a.workers, a.exact_decode, progress, a.video_interval, a.video_max_frames)


def add(
    path: Path,
    inputs: list[str],
    texts: str | None,
    model: str | None,
    vocab: str | None,
    device: str,
    pipeline,
    as_json: bool,
) -> int:
    from clipforge.index import Collection
    from clipforge.index.ingest import add_inputs, needs_encoder

    if not inputs and not texts:
        raise ValueError("index add needs PATH arguments or --texts FILE")
    caption_ids = []
    # counting_commits: a failed write (a full disk) says how many items of this command are stored
    with Collection.open(path) as coll, coll.counting_commits():
        enc = None
        if texts or needs_encoder(inputs):
            enc = collection_encoder(coll, model, vocab, device)
        report = add_inputs(coll, inputs, enc, pipeline)
        if texts:
            lines = [t.strip() for t in Path(texts).read_text(encoding="utf-8").splitlines() if t.strip()]
            caption_ids = coll.add_texts(lines, enc)
        info = {"vectors": len(coll), "rows": coll.info()["rows"]}
    _emit_report(report, info, as_json, "captions", len(caption_ids) if texts else None)
    return 0


def _emit_report(report, info: dict, as_json: bool, extra: str, count: int | None) -> None:
    """An add's or sync's counts (and `extra`: `count`, when not None) as JSON or a summary line."""
    result = {
        "added": len(report.added),
        "updated": len(report.updated),
        "unchanged": len(report.unchanged),
        "skipped": len(report.skipped),
        extra: count or 0,
        "failed": [{"path": p, "reason": r} for p, r in report.failed],
        **info,
    }
    lines = [report.summary() + ("" if count is None else f", {extra} {count}")]
    lines += [f"  failed: {p}: {r}" for p, r in report.failed]
    emit(result, as_json, "\n".join(lines))


def sync(
    path: Path, folder: Path, model: str | None, vocab: str | None, device: str, pipeline, as_json: bool
) -> int:
    from clipforge.index import Collection
    from clipforge.index.ingest import sync as sync_folder

    with Collection.open(path) as coll, coll.counting_commits():
        enc = collection_encoder(coll, model, vocab, device)
        report = sync_folder(coll, folder, enc, pipeline)
        info = {"vectors": len(coll), "rows": coll.info()["rows"]}
    _emit_report(report, info, as_json, "removed", len(report.removed))
    return 0


def remove(path: Path, items: list[str], as_json: bool) -> int:
    from clipforge.index import Collection

    with Collection.open(path) as coll:
        n = coll.remove([int(x) if x.isdigit() else x for x in items])
        info = {"removed": n, "vectors": len(coll), "rows": coll.info()["rows"]}
    emit(info, as_json, f"removed {n} items; {info['vectors']} left")
    return 0


def info(path: Path, as_json: bool) -> int:
    from clipforge.index import Collection

    with Collection.open(path, readonly=True) as coll:
        out = coll.info()
    recall = f", recall@10 {out['recall@10']:.3f}" if "recall@10" in out else ""
    text = (
        f"{path}: {out['vectors']} vectors, {out['rows']} rows, index {out['index_active']}{recall}\n"
        f"  model: {out['model'].get('model')} ({out['model'].get('fingerprint', '')[:19]}..., {out['dim']}-d)"
    )
    emit(out, as_json, text)
    return 0


def build_ivfpq(folder: Path, out: Path, as_json: bool) -> int:
    from clipforge.index.bulk import build_ivfpq as build

    with build(folder, out) as coll:
        res = coll.info()
    emit(
        res,
        as_json,
        f"built {out}: {res['vectors']} vectors, IVF-PQ recall@10 {res.get('recall@10', 1.0):.3f}",
    )
    return 0


def parse_query(query: str | None) -> tuple[str | None, list[str]]:
    """'bicycle -people -cars' -> ('bicycle', ['people', 'cars']); a lone '-' stays a word."""
    if query is None:
        return None, []
    words, negs = [], []
    for w in query.split():
        (negs.append(w[1:]) if w.startswith("-") and len(w) > 1 else words.append(w))
    return (" ".join(words) or None), negs


def _path_prefix(value: str | None) -> str | None:
    """--path-prefix as the collection stores paths (absolute, normalised), keeping a trailing slash."""
    from clipforge.index.files import normalise

    if value is None:
        return None
    return normalise(value) + ("/" if value.endswith("/") and value.strip("/") else "")


def search(path: Path, a: argparse.Namespace, as_json: bool) -> int:
    from clipforge.index import Collection
    from clipforge.index.rank import date_bound

    date_bound(a.after, "--after"), date_bound(a.before, "--before")  # named errors before the model loads
    text, negs = parse_query(a.query)
    negs += a.negative
    if text is None and not a.image:
        raise ValueError("search needs a text query (with at least one positive word) or --image PATH")
    keyword_only = a.mode == "keyword"
    with Collection.open(path, readonly=True) as coll:
        enc = None if keyword_only else collection_encoder(coll, a.model, a.vocab, a.device)
        hits = coll.search(
            text=text,
            image=None if keyword_only else a.image,
            weights=(a.text_weight, a.image_weight),
            negative=negs or None,
            negative_weight=a.negative_weight,
            k=a.k,
            encoder=enc,
            mode=a.mode,
            min_relevance=a.min_relevance,
            sort=a.sort,
            path_prefix=_path_prefix(a.path_prefix),
            after=a.after,
            before=a.before,
            camera=a.camera,
            modality=a.modality,
        )
    rows = [
        {
            "id": h.id,
            "score": round(h.score, 6),
            "relevance": h.relevance,
            "path": h.path,
            "caption": h.caption,
            "metadata": h.metadata,
        }
        for h in hits
    ]
    query = {"text": text, "negative": negs, "image": a.image}
    lines = [f"{r['score']:.4f}  {_relevance(r['relevance'])}  {r['path'] or r['caption']}" for r in rows]
    emit({"query": query, "hits": rows}, as_json, "\n".join(lines) or "no relevant results")
    return 0


def _relevance(value: float | None) -> str:
    return "   -" if value is None else f"{value:.2f}"  # None: too few items to estimate it


def dedup(
    path: Path, threshold: float | None, photo_hamming: int | None, photo_cosine: float | None, as_json: bool
) -> int:
    from clipforge.index import Collection
    from clipforge.media.duplicates import Thresholds, find_duplicates

    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine in [-1, 1], got {threshold}")
    given = {"similar_cosine": threshold, "photo_hamming": photo_hamming, "photo_cosine": photo_cosine}
    t = Thresholds(**{k: v for k, v in given.items() if v is not None})
    with Collection.open(path, readonly=True) as coll:
        groups = find_duplicates(coll, t)
    out = [
        [
            {
                "id": m.hit.id,
                "path": m.hit.path,
                "caption": m.hit.caption,
                "score": round(m.hit.score, 6),
                "tier": m.tier,
            }
            for m in g
        ]
        for g in groups
    ]
    text = "\n\n".join(
        "\n".join(f"{m['score']:.4f}  {m['tier'] or 'anchor':<10}  {m['path'] or m['caption']}" for m in g)
        for g in out
    )
    emit(
        {"threshold": t.similar_cosine, "thresholds": asdict(t), "groups": out},
        as_json,
        text or "no near-duplicates",
    )
    return 0


def embed(a: argparse.Namespace) -> int:
    progress = not a.quiet and sys.stderr.isatty()
    if a.ray:
        from clipforge.index.embed_ray import embed_with_ray

        summary = embed_with_ray(
            a.inputs,
            a.model,
            a.out,
            vocab=a.vocab,
            part_size=a.part_size,
            batch_size=a.batch_size,
            exact_decode=a.exact_decode,
            dtype=a.dtype,
            actors=a.ray_actors,
            video_interval=a.video_interval,
            video_max_frames=a.video_max_frames,
        )
    else:
        from clipforge.index.embed import embed_to_folder

        enc = _load_encoder(a.model, a.vocab, a.device)
        cached = None
        if a.feature_cache is not None:
            from clipforge.paths import features_dir
            from clipforge.train.locked import CachedImageRows

            root = features_dir() if a.feature_cache == "auto" else Path(a.feature_cache).expanduser()
            cached = CachedImageRows(root, enc.model)
        summary = embed_to_folder(
            a.inputs,
            enc,
            a.out,
            part_size=a.part_size,
            batch_size=a.batch_size,
            workers=a.workers,
            exact_decode=a.exact_decode,
            dtype=a.dtype,
            progress=progress,
            cached=cached,
            video_interval=a.video_interval,
            video_max_frames=a.video_max_frames,
        )
    lines = [
        f"embedded {summary.embedded} of {summary.items} items (images, video moments) into {summary.out} "
        f"({summary.parts} parts, "
        f"{summary.parts_done_before} already done)"
    ]
    lines += [f"  skipped {k}: {r}" for k, r in summary.skipped]
    emit(summary.to_dict(), a.json, "\n".join(lines))
    return 0
