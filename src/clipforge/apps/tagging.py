"""Product tagging: multi-label tags from a vocabulary of up to many thousands of tags.

Each tag is a zero-shot class vector (tag x templates, averaged). An image's similarities to all tags are
turned into independent scores in (0, 1):

    score(image, tag) = sigmoid((cos(image, tag) - mean_tags) / std_tags - OFFSET)

where mean and std are over this image's similarities to the whole vocabulary. Standardising per image
removes the per-image offset of CLIP similarities (some images are close to every text); OFFSET = 2.5
makes an uncalibrated score of 0.5 mean "2.5 standard deviations above this image's average tag".
Thresholds per tag are then calibrated on a labelled manifest for a target precision (`calibrate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.apps.calibration import threshold_for_precision
from clipforge.eval.manifest import ManifestError, read_manifest
from clipforge.zeroshot import as_encoder, build_classifier, clean_class_name, load_templates

OFFSET = 2.5
THRESHOLDS_KIND = "clipforge-tag-thresholds"


def read_vocab(path: str | os.PathLike) -> list[str]:
    """One tag a line; blank lines and '#' comments skipped; duplicates are an error."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tag vocabulary {p} does not exist")
    tags = [ln.strip() for ln in p.read_text("utf-8").splitlines() if ln.strip() and not ln.startswith("#")]
    if len(tags) < 2:
        raise ValueError(f"tag vocabulary {p}: needs at least two tags, has {len(tags)}")
    dupes = sorted({t for t in tags if tags.count(t) > 1}) if len(set(tags)) != len(tags) else []
    if dupes:
        raise ValueError(f"tag vocabulary {p}: duplicate tags {dupes[:10]}")
    return tags


def tag_scores(sims: np.ndarray) -> np.ndarray:
    """(N, T) cosine similarities -> (N, T) per-tag scores in (0, 1) (see the module docstring)."""
    mu = sims.mean(axis=1, keepdims=True)
    sd = np.maximum(sims.std(axis=1, keepdims=True), 1e-6)
    return 1.0 / (1.0 + np.exp(-((sims - mu) / sd - OFFSET)))


class Tagger:
    """`Tagger(encoder, vocab, templates="simple", thresholds=None)`; `.tag(images)` returns, per image,
    the tags whose score reaches their threshold (calibrated, else `default_threshold`), best first."""

    def __init__(
        self,
        model: Any,
        vocab: Sequence[str],
        templates: str | os.PathLike | Sequence[str] = "simple",
        thresholds: str | os.PathLike | dict[str, Any] | None = None,
        default_threshold: float = 0.5,
    ) -> None:
        self.encoder = as_encoder(model)
        self.vocab = list(vocab)
        if len(self.vocab) < 2:
            raise ValueError("a tag vocabulary needs at least two tags")
        self.templates = load_templates(templates)
        names = [clean_class_name(t) for t in self.vocab]
        self.weights = build_classifier(self.encoder, names, self.templates)  # (D, T)
        self.thresholds = np.full(len(self.vocab), default_threshold, np.float64)
        if thresholds is not None:
            self.load_thresholds(thresholds)

    def scores(self, images: Sequence[Any]) -> np.ndarray:
        """(N, T) per-tag scores."""
        return tag_scores(self.encoder.embed_images(list(images)) @ self.weights)

    def tag(self, images: Sequence[Any], max_tags: int = 20) -> list[list[tuple[str, float]]]:
        s = self.scores(images)
        out = []
        for row in s:
            hits = np.flatnonzero(row >= self.thresholds)
            hits = hits[np.argsort(-row[hits], kind="stable")][:max_tags]
            out.append([(self.vocab[j], float(row[j])) for j in hits])
        return out

    def load_thresholds(self, src: str | os.PathLike | dict[str, Any]) -> None:
        d = src if isinstance(src, dict) else _read_json(Path(src))
        where = "thresholds" if isinstance(src, dict) else str(src)
        if d.get("kind") != THRESHOLDS_KIND:
            raise ValueError(f"{where}: not a tag thresholds file (kind {d.get('kind')!r})")
        unknown = sorted(set(d.get("tags", {})) - set(self.vocab))
        if unknown:
            raise ValueError(f"{where}: tags not in the vocabulary: {unknown[:10]}")
        default = float(d["default"]) if d.get("default") is not None else np.inf
        per_tag = d.get("tags", {})
        # A null threshold means "no threshold reaches the target precision": the tag is never emitted.
        self.thresholds = np.array(
            [
                np.inf if per_tag.get(t, default) is None else float(per_tag.get(t, default))
                for t in self.vocab
            ]
        )

    def calibrate(
        self, manifest: str | os.PathLike, precision: float = 0.9, min_positives: int = 3
    ) -> dict[str, Any]:
        """Per-tag thresholds reaching `precision` on the manifest's images. Manifest lines:
        {"image": ..., "tags": [...]}. Tags with fewer than `min_positives` positive images share one
        threshold fitted on all (image, tag) pairs pooled. Sets and returns the thresholds dict."""
        if not 0 < precision <= 1:
            raise ValueError(f"target precision must be in (0, 1], got {precision}")
        rows = read_manifest(manifest, required=("image", "tags"))
        index = {t: i for i, t in enumerate(self.vocab)}
        y = np.zeros((len(rows), len(self.vocab)), bool)
        for r, row in enumerate(rows):
            unknown = [t for t in row["tags"] if t not in index]
            if unknown:
                raise ManifestError(f"{row['_line']}: tags not in the vocabulary: {unknown[:5]}")
            y[r, [index[t] for t in row["tags"]]] = True
        s = self.scores([r["image"] for r in rows])
        default = threshold_for_precision(s.ravel(), y.ravel(), precision)
        tags: dict[str, float | None] = {}
        for j, t in enumerate(self.vocab):
            if y[:, j].sum() >= min_positives:
                tags[t] = threshold_for_precision(s[:, j], y[:, j], precision)
        result = {"kind": THRESHOLDS_KIND, "target_precision": precision, "default": default, "tags": tags}
        self.load_thresholds(result)
        pred = s >= self.thresholds
        tp = float((pred & y).sum())
        p = tp / pred.sum() if pred.sum() else 1.0
        rec = tp / y.sum() if y.sum() else 1.0
        result["calibration"] = {"images": len(rows), "precision": float(p), "recall": float(rec)}
        return result


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from e
