"""Zero-shot classification (Radford et al., 2021, section 3.1): class names times prompt templates.

Each class name is put into every template, the texts are embedded, and each class's embeddings are averaged
and re-normalised (the paper's prompt ensemble). The (D, C) matrix of class vectors is a linear classifier on
normalised image features; logits are `logit_scale * features @ weights` and probabilities their softmax.

    clf = ZeroShotClassifier(encoder, ["cat", "dog", "car"], templates="ensemble")
    clf.predict(["a.jpg", "b.jpg"], top_k=3)   # [[("cat", 0.91), ("dog", 0.08), ...], ...]

Classifiers are cached on disk under `paths.cache_dir()/classifiers`, keyed by the model's fingerprint, the
labels and the templates, so a 1,000-class x 60-template classifier is built once per model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipforge import paths

TEMPLATE_SETS = ("simple", "ensemble")


class EncoderLike(Protocol):
    """What the classifier needs: `clipforge.encoder.Encoder` is one; tests pass fakes with known answers."""

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def as_encoder(model: Any) -> EncoderLike:
    """An Encoder, anything with embed_images/embed_texts, or a `(model, preprocess, tokenizer)` triple as
    `clipforge.load` returns it."""
    if hasattr(model, "embed_images") and hasattr(model, "embed_texts"):
        return model
    if isinstance(model, (tuple, list)) and len(model) == 3:
        from clipforge.encoder import Encoder

        return Encoder(*model)
    raise TypeError(
        f"expected a clipforge Encoder or a (model, preprocess, tokenizer) triple, got {type(model).__name__}"
    )


def logit_scale_of(encoder: EncoderLike) -> float:
    """The model's learned temperature (clamped to 100); 100 for encoders that carry no model."""
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "scale"):
        return float(model.scale().detach())
    return float(getattr(encoder, "logit_scale", 100.0))


# ------------------------------------------------------------------------------------------ templates


def load_templates(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """ "simple", "ensemble", a text file (one template a line, '#' comments) or a list of templates.
    Every template must contain "{}" exactly once."""
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in TEMPLATE_SETS:
            text = resources.files("clipforge.templates").joinpath(f"{name}.txt").read_text("utf-8")
            source = f"built-in template set {name!r}"
        elif Path(name).is_file():
            text, source = Path(name).read_text("utf-8"), name
        else:
            raise ValueError(
                f"templates {name!r}: not a file and not a built-in set ({', '.join(TEMPLATE_SETS)})"
            )
        templates = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        templates, source = [str(t) for t in spec], "templates"
    if not templates:
        raise ValueError(f"{source}: no templates")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f'{source}: template {t!r} must contain "{{}}" exactly once')
    return templates


def clean_class_name(name: str) -> str:
    """Turn a dataset label into words a caption would use: 'n02084071 golden_retriever, retriever' ->
    'golden retriever'. Drops a leading WordNet id, keeps the first of comma-separated synonyms, turns
    underscores into spaces and squeezes whitespace."""
    s = re.sub(r"^n\d{8}\s+", "", str(name).strip())
    s = s.split(",")[0].replace("_", " ")
    s = re.sub(r"\s+", " ", s).strip()
    if not s:
        raise ValueError(f"class name {name!r} is empty after clean-up")
    return s


def read_labels(labels: str | None = None, labels_file: str | os.PathLike | None = None) -> list[str]:
    """Labels from a comma-separated string and/or a file with one label a line (blank lines skipped)."""
    out = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if labels_file is not None:
        p = Path(labels_file)
        if not p.is_file():
            raise FileNotFoundError(f"labels file {p} does not exist")
        out += [ln.strip() for ln in p.read_text("utf-8").splitlines() if ln.strip()]
    if not out:
        raise ValueError("no labels: pass --labels 'a,b,c' or --labels-file FILE")
    return out


# ----------------------------------------------------------------------------------------- classifier


def _cache_path(fingerprint: str, names: Sequence[str], templates: Sequence[str]) -> Path:
    key = json.dumps({"model": fingerprint, "names": list(names), "templates": list(templates)})
    return paths.cache_dir() / "classifiers" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.npy"


def _fingerprint(encoder: EncoderLike) -> str | None:
    identity = getattr(encoder, "identity", None)
    return identity.get("fingerprint") if isinstance(identity, dict) else None


def embed_classes(encoder: EncoderLike, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(D, C) class vectors: the mean of each class's normalised template embeddings, re-normalised."""
    texts = [t.format(n) for n in names for t in templates]  # class-major: rows c*T .. c*T+T-1
    e = np.asarray(encoder.embed_texts(texts), np.float32)  # (C*T, D)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    w = e.reshape(len(names), len(templates), -1).mean(axis=1)  # (C, D)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(w.T)


def build_classifier(
    encoder: EncoderLike, names: Sequence[str], templates: Sequence[str], cache: bool = True
) -> np.ndarray:
    """`embed_classes`, read from or written to the on-disk cache when the encoder has a fingerprint."""
    fp = _fingerprint(encoder) if cache else None
    path = _cache_path(fp, names, templates) if fp else None
    if path is not None and path.is_file():
        w = np.load(path)
        if w.shape[1] == len(names):
            return w
    w = embed_classes(encoder, names, templates)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, w)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return w


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class ZeroShotClassifier:
    """A linear classifier over image features whose weights come from class names and prompt templates.

    `labels` are returned as given; the text put into the templates is `clean_class_name(label)` (pass
    `clean=False` to use labels verbatim). `weights` is (D, C); `logit_scale` the model's temperature."""

    def __init__(
        self,
        model: Any,
        labels: Sequence[str],
        templates: str | os.PathLike | Sequence[str] = "ensemble",
        *,
        cache: bool = True,
        clean: bool = True,
    ) -> None:
        if isinstance(labels, str):
            raise TypeError("labels must be a list of class names, not one string")
        self.encoder = as_encoder(model)
        self.labels = [str(x).strip() for x in labels]
        if not self.labels:
            raise ValueError("a classifier needs at least one label")
        dupes = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels: {dupes}")
        self.names = [clean_class_name(x) if clean else x for x in self.labels]
        self.templates = load_templates(templates)
        self.weights = build_classifier(self.encoder, self.names, self.templates, cache=cache)  # (D, C)
        self.logit_scale = logit_scale_of(self.encoder)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) normalised image features -> (N, C) scaled cosine similarities."""
        return self.logit_scale * (np.asarray(features, np.float32) @ self.weights)

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Image paths, bytes or PIL images -> (N, C) class probabilities."""
        return softmax(self.logits(self.encoder.embed_images(_as_list(images))))

    def predict(self, images: Sequence[Any], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` (label, probability) pairs, most probable first."""
        return self.top_labels(self.predict_proba(images), top_k)

    def top_labels(self, probs: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        k = min(top_k, len(self.labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    def fine_tuned(
        self,
        images: Sequence[Any],
        labels: Sequence[str],
        steps: int = 200,
        lr: float = 1e-3,
        anchor: float = 1.0,
    ) -> ZeroShotClassifier:
        """Few-shot: a copy whose weights start at the text classifier and are fitted to a few labelled
        images per class (see `clipforge.eval.probe.fit_text_head`)."""
        from clipforge.eval.probe import fit_text_head

        index = {x: i for i, x in enumerate(self.labels)}
        unknown = sorted({x for x in labels if x not in index})
        if unknown:
            raise ValueError(f"labels not in the classifier: {unknown}")
        feats = self.encoder.embed_images(_as_list(images))
        targets = np.array([index[x] for x in labels])
        out = copy.copy(self)
        out.weights = fit_text_head(feats, targets, self.weights, self.logit_scale, steps, lr, anchor)
        return out


def _as_list(images: Any) -> list[Any]:
    # One image (a path or a PIL image) is a batch of one; a plain string is never iterated character-wise.
    if isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "getpixel"):
        return [images]
    return list(images)
