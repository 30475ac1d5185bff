"""Zero-shot classification (Radford et al., 2021, section 3.1): class names times prompt templates.

Each class name is put into every template, the texts are embedded, and each class's embeddings are averaged
and re-normalised (the paper's prompt ensemble). The (D, C) matrix of class vectors is a linear classifier on
normalised image features; logits are `logit_scale * features @ weights` and probabilities their softmax.

    clf = ZeroShotClassifier(encoder, ["cat", "dog", "car"], templates="ensemble")
    clf.predict(["a.jpg", "b.jpg"], top_k=3)   # [[("cat", 0.91), ("dog", 0.08), ...], ...]

The classifier works on vectors; the encoder is only a convenience. A caller that already holds vectors (the
service, a collection) builds it with `ZeroShotClassifier.from_text_vectors` from the embeddings of
`label_prompts(labels, templates)` and calls the `*_vectors` methods with image vectors.

Classifiers built from an encoder are cached on disk under `paths.cache_dir()/classifiers`, keyed by the
model's fingerprint, the labels and the templates, so a 1,000-class x 60-template classifier is built once
per model. `fit_text_head` (few-shot) lives here too, so that clipforge.eval imports this module and never
the reverse.
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge import paths
from clipforge.atomic import write_atomic
from clipforge.encoder import EncoderLike, EncoderSource, as_encoder, need_encoder

TEMPLATE_SETS = ("simple", "ensemble", "corpus", "waffle")
# Few-shot head defaults. The pull towards the text weights is a sum over all D x C weights against a mean
# cross-entropy, so it dominates quickly: with anchor 1.0 (lr 1e-3) the head of the tests' shapes model could
# not learn a single class whose prompt was wrong (0 of 20 held-out images) from 4 shots per class; with these
# it learned 16 of 20 and kept the other classes' accuracy (tests/test_zeroshot.py).
HEAD_STEPS, HEAD_LR, HEAD_ANCHOR = 200, 1e-2, 0.1


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


def prompt_texts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every name in every template, class-major: rows c*T .. c*T+T-1 belong to class c."""
    return [t.format(n) for n in names for t in templates]


def label_prompts(labels: Sequence[str], templates: Sequence[str], clean: bool = True) -> list[str]:
    """The prompts of `labels` (cleaned with `clean_class_name` unless `clean=False`) in `templates`,
    class-major: the texts whose vectors `ZeroShotClassifier.from_text_vectors` and
    `Tagger.from_text_vectors` take."""
    return prompt_texts([clean_class_name(x) if clean else str(x).strip() for x in labels], templates)


def class_vectors(text_vectors: np.ndarray, n_classes: int) -> np.ndarray:
    """(C*T, D) embeddings of `prompt_texts` -> (D, C) class vectors: the mean of each class's normalised
    prompt embeddings, re-normalised (the paper's prompt ensemble)."""
    e = np.asarray(text_vectors, np.float32)
    if e.ndim != 2 or n_classes < 1 or len(e) % n_classes:
        raise ValueError(
            f"expected (classes x templates, D) prompt vectors for {n_classes} classes, got shape {e.shape}"
        )
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    w = e.reshape(n_classes, len(e) // n_classes, -1).mean(axis=1)  # (C, D)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(w.T)


def embed_classes(encoder: EncoderLike, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(D, C) class vectors of `names` in `templates`, embedded by `encoder`."""
    return class_vectors(encoder.embed_texts(prompt_texts(names, templates)), len(names))


def _cache_path(fingerprint: str, names: Sequence[str], templates: Sequence[str]) -> Path:
    key = json.dumps({"model": fingerprint, "names": list(names), "templates": list(templates)})
    return paths.cache_dir() / "classifiers" / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.npy"


def build_classifier(
    encoder: EncoderLike, names: Sequence[str], templates: Sequence[str], cache: bool = True
) -> np.ndarray:
    """`embed_classes`, read from or written to the on-disk cache when the encoder has a fingerprint."""
    fp = encoder.identity.get("fingerprint") if cache else None
    path = _cache_path(fp, names, templates) if fp else None
    if path is not None and path.is_file():
        w = np.load(path)
        if w.shape[1] == len(names):
            return w
    w = embed_classes(encoder, names, templates)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a concurrent reader sees the old file or the whole new one; a lost cache is recomputed
        write_atomic(path, lambda f: np.save(f, w), durable=False)
    return w


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def fit_text_head(
    features: np.ndarray,
    targets: np.ndarray,
    init: np.ndarray,
    logit_scale: float,
    steps: int = HEAD_STEPS,
    lr: float = HEAD_LR,
    anchor: float = HEAD_ANCHOR,
) -> np.ndarray:
    """Few-shot: (N, D) features and (N,) class indices -> (D, C) weights, starting at `init` (the text
    classifier). Full-batch AdamW on cross-entropy of `logit_scale * f @ W` plus `anchor * ||W - init||^2`,
    an L2 pull towards the text weights that keeps the head from forgetting what the prompts said about
    classes with few examples."""
    f = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(targets, np.int64))
    w0 = torch.from_numpy(np.asarray(init, np.float32))
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(logit_scale * f @ w, y) + anchor * (w - w0).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach().numpy()


class ZeroShotClassifier:
    """A linear classifier over image features whose weights come from class names and prompt templates.

    `labels` are returned as given; the text put into the templates is `clean_class_name(label)` (pass
    `clean=False` to use labels verbatim). `weights` is (D, C); `logit_scale` the model's temperature.
    Every method that takes images has a `*_vectors` twin that takes (N, D) image vectors instead."""

    def __init__(
        self,
        model: EncoderSource,
        labels: Sequence[str],
        templates: str | os.PathLike | Sequence[str] = "ensemble",
        *,
        cache: bool = True,
        clean: bool = True,
    ) -> None:
        encoder = as_encoder(model)
        self._setup(labels, templates, clean, encoder.logit_scale, encoder)
        self.weights = build_classifier(encoder, self.names, self.templates, cache=cache)  # (D, C)

    @classmethod
    def from_text_vectors(
        cls,
        labels: Sequence[str],
        text_vectors: np.ndarray,
        templates: str | os.PathLike | Sequence[str],
        *,
        logit_scale: float,
        clean: bool = True,
    ) -> ZeroShotClassifier:
        """A classifier from prompt vectors the caller already holds: `text_vectors` (C*T, D) are the
        embeddings of `label_prompts(labels, load_templates(templates), clean)`. It holds no encoder: use the
        `*_vectors` methods."""
        clf = cls.__new__(cls)
        clf._setup(labels, templates, clean, logit_scale, None)
        if len(text_vectors) != len(clf.names) * len(clf.templates):
            raise ValueError(
                f"{len(text_vectors)} prompt vectors for {len(clf.names)} labels x {len(clf.templates)} templates"
            )
        clf.weights = class_vectors(text_vectors, len(clf.names))
        return clf

    def _setup(
        self,
        labels: Sequence[str],
        templates: str | os.PathLike | Sequence[str],
        clean: bool,
        logit_scale: float,
        encoder: EncoderLike | None,
    ) -> None:
        if isinstance(labels, str):
            raise TypeError("labels must be a list of class names, not one string")
        self.labels = [str(x).strip() for x in labels]
        if not self.labels:
            raise ValueError("a classifier needs at least one label")
        dupes = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels: {dupes}")
        self.names = [clean_class_name(x) if clean else x for x in self.labels]
        self.templates = load_templates(templates)
        self.logit_scale = float(logit_scale)
        self.encoder = encoder

    def _embed_images(self, images: Any) -> np.ndarray:
        return need_encoder(self.encoder, "classifier").embed_images(_as_list(images))

    # ---- vectors ---------------------------------------------------------------------------------
    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, D) normalised image features -> (N, C) scaled cosine similarities."""
        return self.logit_scale * (np.asarray(features, np.float32) @ self.weights)

    def predict_proba_vectors(self, features: np.ndarray) -> np.ndarray:
        """(N, D) normalised image features -> (N, C) class probabilities."""
        return softmax(self.logits(features))

    def predict_vectors(self, features: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image vector, the `top_k` (label, probability) pairs, most probable first."""
        return self.top_labels(self.predict_proba_vectors(features), top_k)

    def top_labels(self, probs: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        k = min(top_k, len(self.labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    def fine_tuned_vectors(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        steps: int = HEAD_STEPS,
        lr: float = HEAD_LR,
        anchor: float = HEAD_ANCHOR,
    ) -> ZeroShotClassifier:
        """Few-shot: a copy whose weights start at the text classifier and are fitted to a few labelled
        image vectors per class (see `fit_text_head`)."""
        index = {x: i for i, x in enumerate(self.labels)}
        unknown = sorted({x for x in labels if x not in index})
        if unknown:
            raise ValueError(f"labels not in the classifier: {unknown}")
        targets = np.array([index[x] for x in labels])
        out = copy.copy(self)
        out.weights = fit_text_head(features, targets, self.weights, self.logit_scale, steps, lr, anchor)
        return out

    # ---- images, through the encoder ---------------------------------------------------------------
    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Image paths, bytes or PIL images -> (N, C) class probabilities."""
        return self.predict_proba_vectors(self._embed_images(images))

    def predict(self, images: Sequence[Any], top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the `top_k` (label, probability) pairs, most probable first."""
        return self.predict_vectors(self._embed_images(images), top_k)

    def fine_tuned(
        self,
        images: Sequence[Any],
        labels: Sequence[str],
        steps: int = HEAD_STEPS,
        lr: float = HEAD_LR,
        anchor: float = HEAD_ANCHOR,
    ) -> ZeroShotClassifier:
        """`fine_tuned_vectors` on the images' vectors."""
        return self.fine_tuned_vectors(self._embed_images(images), labels, steps, lr, anchor)


def _as_list(images: Any) -> list[Any]:
    # One image (a path, bytes or a PIL image) is a batch of one; a string is never iterated character-wise.
    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        return [images]
    return list(images)
