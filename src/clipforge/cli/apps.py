"""Application sub-commands: classify, tag (and tag calibrate), moderate (and moderate calibrate), score,
rank and explain. Each parses flags into explicit arguments of one plain function here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from clipforge.cli.common import add_json_flag, add_long_flag, add_model_flags, emit


def _encoder(model: str, vocab: str | None, device: str, long: str = "truncate") -> Any:
    from clipforge.encoder import Encoder

    return Encoder.load(model, vocab=vocab, device=device, long=long)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="zero-shot classify images among labels given as text")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--labels", default=None, help="comma-separated class names, e.g. 'cat,dog,car'")
    p.add_argument("--labels-file", default=None, help="file with one class name a line")
    p.add_argument("--top-k", type=int, default=3, help="labels to print per image (default 3)")
    p.add_argument("--templates", default="ensemble", help="simple | ensemble | a file of templates with {}")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(
        run=lambda a: classify(
            a.model, a.vocab, a.device, a.images, a.labels, a.labels_file, a.top_k, a.templates, a.json
        )
    )
    _register_tag(sub)
    _register_moderate(sub)
    _register_score_rank_explain(sub)


def _register_tag(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tag", help="multi-label tags from a file of tags ('tag calibrate' fits thresholds)")
    p.add_argument("images", nargs="+", help="image files, or 'calibrate' followed by its flags")
    p.add_argument("--tags", default=None, help="the tags: a text file, one tag a line")
    p.add_argument(
        "--vocab", dest="tags_alias", action=_DeprecatedTagsFlag, default=None, help=argparse.SUPPRESS
    )
    p.add_argument("--thresholds", default=None, help="thresholds JSON from 'tag calibrate'")
    p.add_argument("--templates", default="simple", help="simple | ensemble | a template file")
    p.add_argument("--max-tags", type=int, default=20)
    p.add_argument("--manifest", default=None, help="(calibrate) JSON lines {image, tags}")
    p.add_argument("--precision", type=float, default=0.9, help="(calibrate) target precision")
    p.add_argument("--out", default=None, help="(calibrate) where to write the thresholds JSON")
    p.add_argument("--model", "-m", default="default", help="checkpoint path or 'default'")
    # Until --vocab stops meaning the tag file here, the tokenizer's vocabulary is --tokenizer-vocab.
    p.add_argument(
        "--tokenizer-vocab", dest="vocab", default=None, help="tokenizer vocabulary for bare checkpoints"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_json_flag(p)
    p.set_defaults(run=_run_tag)


class _DeprecatedTagsFlag(argparse.Action):
    """`tag --vocab FILE`: the old name of --tags. Every other command's --vocab is the tokenizer's
    vocabulary, so this one warns and will take that meaning once the alias is gone."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, value: Any, option: str | None = None
    ) -> None:
        print("clipforge tag: warning: --vocab FILE is deprecated here; use --tags FILE", file=sys.stderr)
        setattr(namespace, self.dest, value)


def _tags_file(a: argparse.Namespace) -> str:
    if a.tags is not None and a.tags_alias is not None:
        raise ValueError("give the tag file once: --tags (or the deprecated --vocab), not both")
    tags = a.tags if a.tags is not None else a.tags_alias
    if tags is None:
        raise ValueError("tag needs --tags FILE (one tag a line)")
    return tags


def _run_tag(a: argparse.Namespace) -> int:
    tags = _tags_file(a)
    if a.images[0] == "calibrate" and not Path("calibrate").exists():
        if a.manifest is None or a.out is None:
            raise ValueError("tag calibrate needs --manifest and --out")
        return tag_calibrate(
            a.model, a.vocab, a.device, tags, a.templates, a.manifest, a.precision, a.out, a.json
        )
    return tag(a.model, a.vocab, a.device, tags, a.templates, a.thresholds, a.images, a.max_tags, a.json)


def _register_moderate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moderate", help="screen images (and captions) against a policy file")
    p.add_argument("items", nargs="+", help="image files, or 'calibrate' followed by its flags")
    p.add_argument("--policy", required=True, help="policy file (.yaml/.yml or .json)")
    p.add_argument(
        "--caption", action="append", default=None, help="caption of an item (repeat once per item, in order)"
    )
    p.add_argument("--manifest", default=None, help="(calibrate) JSON lines {image, caption?, categories}")
    p.add_argument("--precision", type=float, default=None, help="(calibrate) target precision of block")
    p.add_argument("--recall", type=float, default=None, help="(calibrate) target recall of review-or-block")
    p.add_argument("--out", default=None, help="(calibrate) where to write the calibrated policy")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(run=_run_moderate)


def _run_moderate(a: argparse.Namespace) -> int:
    if a.items[0] == "calibrate" and not Path("calibrate").exists():
        if a.manifest is None or a.out is None:
            raise ValueError("moderate calibrate needs --manifest and --out")
        return moderate_calibrate(
            a.model, a.vocab, a.device, a.policy, a.manifest, a.precision, a.recall, a.out, a.json
        )
    return moderate(a.model, a.vocab, a.device, a.policy, a.items, a.caption, a.json)


def _register_score_rank_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="CLIP score of each image against its caption (line i of --captions)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument(
        "--captions", required=True, help="text file: one caption a line, in the order of the images"
    )
    add_model_flags(p)
    add_long_flag(p)
    add_json_flag(p)
    p.set_defaults(run=lambda a: score(a.model, a.vocab, a.device, a.images, a.captions, a.json, a.long))

    p = sub.add_parser("rank", help="rank images against --text, or texts against --image")
    p.add_argument("candidates", nargs="+", help="image files (with --text) or texts (with --image)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", default=None, help="the prompt to rank images against")
    q.add_argument("--image", default=None, help="the image to rank texts against")
    add_model_flags(p)
    add_long_flag(p)
    add_json_flag(p)
    p.set_defaults(
        run=lambda a: rank(a.model, a.vocab, a.device, a.text, a.image, a.candidates, a.json, a.long)
    )

    p = sub.add_parser("explain", help="heat map of the image regions that match a text")
    p.add_argument("image", help="image file")
    p.add_argument("--text", required=True, help="the text to explain")
    p.add_argument("--out", required=True, help="PNG to write: image, overlay and heat map side by side")
    p.add_argument("--method", choices=["occlusion", "tokens", "gradient"], default="occlusion")
    add_model_flags(p)
    add_json_flag(p)
    p.set_defaults(
        run=lambda a: explain(a.model, a.vocab, a.device, a.image, a.text, a.out, a.method, a.json)
    )


def classify(
    model: str,
    vocab: str | None,
    device: str,
    images: list[str],
    labels: str | None,
    labels_file: str | None,
    top_k: int,
    templates: str,
    as_json: bool,
) -> int:
    from clipforge.zeroshot import ZeroShotClassifier, read_labels

    clf = ZeroShotClassifier(_encoder(model, vocab, device), read_labels(labels, labels_file), templates)
    preds = clf.predict(images, top_k)
    result = [
        {"image": im, "labels": [{"label": lab, "probability": p} for lab, p in row]}
        for im, row in zip(images, preds)
    ]
    text = "\n".join(
        f"{im}: " + ", ".join(f"{lab} {p:.3f}" for lab, p in row) for im, row in zip(images, preds)
    )
    emit(result, as_json, text)
    return 0


def tag(
    model: str,
    vocab: str | None,
    device: str,
    tags_file: str,
    templates: str,
    thresholds: str | None,
    images: list[str],
    max_tags: int,
    as_json: bool,
) -> int:
    from clipforge.apps.tagging import Tagger, read_tags

    tagger = Tagger(_encoder(model, vocab, device), read_tags(tags_file), templates, thresholds)
    rows = tagger.tag(images, max_tags)
    result = [
        {"image": im, "tags": [{"tag": t, "score": s} for t, s in row]} for im, row in zip(images, rows)
    ]
    emit(
        result, as_json, "\n".join(f"{im}: " + ", ".join(t for t, _ in row) for im, row in zip(images, rows))
    )
    return 0


def tag_calibrate(
    model: str,
    vocab: str | None,
    device: str,
    tags_file: str,
    templates: str,
    manifest: str,
    precision: float,
    out: str,
    as_json: bool,
) -> int:
    from clipforge.apps.tagging import Tagger, read_tags

    tagger = Tagger(_encoder(model, vocab, device), read_tags(tags_file), templates)
    result = tagger.calibrate(manifest, precision)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    cal = result["calibration"]
    emit(
        result,
        as_json,
        f"wrote {out}: precision {cal['precision']:.3f}, recall {cal['recall']:.3f} on the manifest",
    )
    return 0


def moderate(
    model: str,
    vocab: str | None,
    device: str,
    policy: str,
    items: list[str],
    captions: list[str] | None,
    as_json: bool,
) -> int:
    from clipforge.apps.moderation import Moderator

    if captions is not None and len(captions) != len(items):
        raise ValueError(f"{len(captions)} --caption flags for {len(items)} items: give one per item or none")
    results = Moderator(_encoder(model, vocab, device), policy).moderate(items, captions)
    lines = [
        f"{r['item']}: {r['decision']} ("
        + ", ".join(f"{k} {v['score']:.2f}" for k, v in r["categories"].items())
        + ")"
        for r in results
    ]
    emit(results, as_json, "\n".join(lines))
    return 0


def moderate_calibrate(
    model: str,
    vocab: str | None,
    device: str,
    policy: str,
    manifest: str,
    precision: float | None,
    recall: float | None,
    out: str,
    as_json: bool,
) -> int:
    from clipforge.apps.moderation import Moderator, save_policy

    calibrated = Moderator(_encoder(model, vocab, device), policy).calibrate(manifest, precision, recall)
    save_policy(calibrated, out)
    emit(calibrated.to_dict(), as_json, f"wrote {out}")
    return 0


def score(
    model: str,
    vocab: str | None,
    device: str,
    images: list[str],
    captions_file: str,
    as_json: bool,
    long: str = "truncate",
) -> int:
    from clipforge.apps.score import SCALES, pair_similarity

    p = Path(captions_file)
    if not p.is_file():
        raise FileNotFoundError(f"captions file {p} does not exist")
    captions = [ln.strip() for ln in p.read_text("utf-8").splitlines() if ln.strip()]
    if len(captions) != len(images):
        raise ValueError(
            f"{p}: {len(captions)} captions for {len(images)} images (one caption a line, in order)"
        )
    cos = pair_similarity(_encoder(model, vocab, device, long), images, captions)
    rows = [
        {
            "image": im,
            "caption": cap,
            "cosine": float(c),
            "clip_score_torchmetrics": SCALES["torchmetrics"] * max(float(c), 0.0),
            "clip_s": SCALES["clipscore"] * max(float(c), 0.0),
        }
        for im, cap, c in zip(images, captions, cos)
    ]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("clip_score_torchmetrics", "clip_s")}
    result = {"items": rows, "mean": mean}
    emit(result, as_json, "\n".join(f"{r['image']}: {r['clip_score_torchmetrics']:.2f}" for r in rows))
    return 0


def rank(
    model: str,
    vocab: str | None,
    device: str,
    text: str | None,
    image: str | None,
    candidates: list[str],
    as_json: bool,
    long: str = "truncate",
) -> int:
    from clipforge.apps.rank import rank_images, rank_texts

    enc = _encoder(model, vocab, device, long)
    ranked = rank_images(enc, text, candidates) if text is not None else rank_texts(enc, image, candidates)
    key = "image" if text is not None else "text"
    emit(ranked, as_json, "\n".join(f"{r['rank']}. {r[key]} ({r['probability']:.3f})" for r in ranked))
    return 0


def explain(
    model: str, vocab: str | None, device: str, image: str, text: str, out: str, method: str, as_json: bool
) -> int:
    from clipforge.apps.explain import explain as heat_map
    from clipforge.apps.explain import save_overlay

    enc = _encoder(model, vocab, device)
    heat, crop = heat_map(enc, image, text, method)
    save_overlay(crop, heat, out)
    g = heat.shape[0]
    peak = divmod(int(heat.argmax()), g)
    result = {
        "image": image,
        "text": text,
        "out": out,
        "method": method,
        "peak": {"row": peak[0] / g, "col": peak[1] / g},
    }
    emit(result, as_json, f"wrote {out}")
    return 0
