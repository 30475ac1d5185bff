"""Product tagging: multi-label tags from a vocabulary of up to many thousands of tags.

Each tag is a zero-shot class vector (tag x templates, averaged). An image's similarities to all tags are
turned into independent scores in (0, 1):

    score(image, tag) = sigmoid((cos(image, tag) - mean_tags) / std_tags - OFFSET)

where mean and std are over this image's similarities to the whole vocabulary. Standardising per image
removes the per-image offset of CLIP similarities (some images are close to every text); OFFSET = 2.5
makes an uncalibrated score of 0.5 mean "2.5 standard deviations above this image's average tag".
Thresholds per tag are then calibrated on a labelled manifest for a target precision (`calibrate`).

The tagger works on vectors: `Tagger.from_text_vectors` builds it from the embeddings of
`zeroshot.label_prompts(vocab, templates)`, and every method that takes images has a `*_vectors` twin taking (N, D)
image vectors. `Tagger(encoder, vocab)` and the image methods are thin wrappers that embed through an encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.apps.calibration import threshold_for_precision
from clipforge.encoder import EncoderLike, EncoderSource, as_encoder, need_encoder
from clipforge.eval.manifest import ManifestError, read_labelled_manifest
from clipforge.zeroshot import build_classifier, class_vectors, clean_class_name, load_templates

OFFSET = 2.5
THRESHOLDS_KIND = "clipforge-tag-thresholds"


def read_tags(path: str | os.PathLike) -> list[str]:
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
        model: EncoderSource,
        vocab: Sequence[str],
        templates: str | os.PathLike | Sequence[str] = "simple",
        thresholds: str | os.PathLike | dict[str, Any] | None = None,
        default_threshold: float = 0.5,
    ) -> None:
        encoder = as_encoder(model)
        self._setup(vocab, templates, encoder)
        names = [clean_class_name(t) for t in self.vocab]
        self.weights = build_classifier(encoder, names, self.templates)  # (D, T)
        self._set_thresholds(thresholds, default_threshold)

    @classmethod
    def from_text_vectors(
        cls,
        vocab: Sequence[str],
        text_vectors: np.ndarray,
        templates: str | os.PathLike | Sequence[str] = "simple",
        thresholds: str | os.PathLike | dict[str, Any] | None = None,
        default_threshold: float = 0.5,
    ) -> Tagger:
        """A tagger from the caller's (T * templates, D) embeddings of
        `zeroshot.label_prompts(vocab, load_templates(templates))`. It holds no encoder: use the `*_vectors`
        methods."""
        tagger = cls.__new__(cls)
        tagger._setup(vocab, templates, None)
        if len(text_vectors) != len(tagger.vocab) * len(tagger.templates):
            raise ValueError(
                f"{len(text_vectors)} prompt vectors for {len(tagger.vocab)} tags x "
                f"{len(tagger.templates)} templates"
            )
        tagger.weights = class_vectors(text_vectors, len(tagger.vocab))
        tagger._set_thresholds(thresholds, default_threshold)
        return tagger

    def _setup(
        self, vocab: Sequence[str], templates: str | os.PathLike | Sequence[str], encoder: EncoderLike | None
    ) -> None:
        self.vocab = list(vocab)
        if len(self.vocab) < 2:
            raise ValueError("a tag vocabulary needs at least two tags")
        self.templates = load_templates(templates)
        self.encoder = encoder

    def _set_thresholds(self, thresholds: str | os.PathLike | dict[str, Any] | None, default: float) -> None:
        self.thresholds = np.full(len(self.vocab), default, np.float64)
        if thresholds is not None:
            self.load_thresholds(thresholds)

    def _embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return need_encoder(self.encoder, "tagger").embed_images(list(images))

    # ---- vectors ---------------------------------------------------------------------------------
    def scores_vectors(self, features: np.ndarray) -> np.ndarray:
        """(N, D) image vectors -> (N, T) per-tag scores."""
        return tag_scores(np.asarray(features, np.float32) @ self.weights)

    def tag_vectors(self, features: np.ndarray, max_tags: int = 20) -> list[list[tuple[str, float]]]:
        """Per image vector, the (tag, score) pairs reaching their thresholds, best first."""
        out = []
        for row in self.scores_vectors(features):
            hits = np.flatnonzero(row >= self.thresholds)
            hits = hits[np.argsort(-row[hits], kind="stable")][:max_tags]
            out.append([(self.vocab[j], float(row[j])) for j in hits])
        return out

    def calibrate_vectors(
        self,
        features: np.ndarray,
        tags: Sequence[Sequence[str]],
        precision: float = 0.9,
        min_positives: int = 3,
        where: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Per-tag thresholds reaching `precision` on labelled image vectors: `tags[i]` are image i's tags
        (`where[i]` names it in errors). Tags with fewer than `min_positives` positive images share one
        threshold fitted on all (image, tag) pairs pooled. Sets and returns the thresholds dict."""
        if not 0 < precision <= 1:
            raise ValueError(f"target precision must be in (0, 1], got {precision}")
        y = self._targets(tags, where or [f"item {i}" for i in range(len(tags))])
        s = self.scores_vectors(features)
        per_tag: dict[str, float | None] = {
            t: threshold_for_precision(s[:, j], y[:, j], precision)
            for j, t in enumerate(self.vocab)
            if y[:, j].sum() >= min_positives
        }
        default = threshold_for_precision(s.ravel(), y.ravel(), precision)
        result = {"kind": THRESHOLDS_KIND, "target_precision": precision, "default": default, "tags": per_tag}
        self.load_thresholds(result)
        pred = s >= self.thresholds
        tp = float((pred & y).sum())
        p = tp / pred.sum() if pred.sum() else 1.0
        rec = tp / y.sum() if y.sum() else 1.0
        # Measured on the items the thresholds were fitted to: an optimistic estimate, not a held-out one.
        result["calibration"] = {"images": len(tags), "precision": float(p), "recall": float(rec)}
        return result

    def _targets(self, tags: Sequence[Sequence[str]], where: Sequence[str]) -> np.ndarray:
        """(N, T) bool: image i carries tag j."""
        index = {t: i for i, t in enumerate(self.vocab)}
        y = np.zeros((len(tags), len(self.vocab)), bool)
        for r, row in enumerate(tags):
            unknown = [t for t in row if t not in index]
            if unknown:
                raise ManifestError(f"{where[r]}: tags not in the vocabulary: {unknown[:5]}")
            y[r, [index[t] for t in row]] = True
        return y

    # ---- images, through the encoder ---------------------------------------------------------------
    def scores(self, images: Sequence[Any]) -> np.ndarray:
        """(N, T) per-tag scores."""
        return self.scores_vectors(self._embed_images(images))

    def tag(self, images: Sequence[Any], max_tags: int = 20) -> list[list[tuple[str, float]]]:
        return self.tag_vectors(self._embed_images(images), max_tags)

    def calibrate(
        self, manifest: str | os.PathLike, precision: float = 0.9, min_positives: int = 3
    ) -> dict[str, Any]:
        """`calibrate_vectors` on a manifest's images; lines {"image": ..., "tags": [...]}."""
        rows = read_labelled_manifest(manifest, required=("image", "tags"))
        tags, where = [r["tags"] for r in rows], [r["_line"] for r in rows]
        self._targets(tags, where)  # a bad line fails before any image is embedded
        features = self._embed_images([r["image"] for r in rows])
        return self.calibrate_vectors(features, tags, precision, min_positives, where)

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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from e
