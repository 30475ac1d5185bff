"""Content moderation from a policy file: categories described by prompts, a decision per item.

A policy (YAML or JSON):

    neutral: ["a photo", "an ordinary everyday scene"]    # what harmless content looks like (optional)
    caption_weight: 0.5                                   # weight of the item's caption when one is given
    categories:
      - name: weapons
        prompts: ["a photo of a gun", "a person holding a knife"]
        negative: ["a toy water pistol", "a kitchen knife on a chopping board"]   # optional look-alikes
        threshold: 0.6              # score >= threshold: block
        review_threshold: 0.4       # optional (default threshold - 0.2): score >= it: review

A category's score is the probability mass of its positive prompts in a softmax (with the model's logit
scale) over its positive prompts, its negative prompts and the policy's neutral prompts: "how much more
does this look like the category than like its look-alikes or like ordinary content". With a caption, the
same score is computed for the caption's text embedding and mixed in with `caption_weight`. A prompt
"fires" when it is more similar to the item than every negative and neutral prompt.
The item's decision is block if any category blocks, else review if any asks for review, else allow.

The moderator works on vectors: `Moderator.from_text_vectors(policy, vectors, logit_scale)` takes the
embeddings of `policy_texts(policy)` (a dict text -> vector), and `moderate_vectors` / `scores_vectors` take
(N, D) image vectors and optional caption vectors. `Moderator(encoder, policy)` and the image methods are thin
wrappers that embed through an encoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.apps.calibration import precision_recall, threshold_for_precision, threshold_for_recall
from clipforge.encoder import EncoderLike, EncoderSource, as_encoder, need_encoder
from clipforge.eval.manifest import ManifestError, read_labelled_manifest
from clipforge.zeroshot import softmax

DEFAULT_NEUTRAL = ("a photo", "an ordinary everyday scene", "a picture of an object")
DEFAULT_REVIEW_MARGIN = 0.2


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Category:
    name: str
    prompts: tuple[str, ...]
    negative: tuple[str, ...] = ()
    threshold: float = 0.5
    review_threshold: float | None = None

    @property
    def review(self) -> float:
        if self.review_threshold is not None:
            return min(self.review_threshold, self.threshold)
        return max(self.threshold - DEFAULT_REVIEW_MARGIN, 0.0)


@dataclass(frozen=True)
class Policy:
    categories: tuple[Category, ...]
    neutral: tuple[str, ...] = DEFAULT_NEUTRAL
    caption_weight: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the calibration record, written back out

    def to_dict(self) -> dict[str, Any]:
        cats = []
        for c in self.categories:
            d = {k: v for k, v in dataclasses.asdict(c).items() if v not in (None, ())}
            cats.append({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})
        return {
            "neutral": list(self.neutral),
            "caption_weight": self.caption_weight,
            "categories": cats,
            **self.extra,
        }


def parse_policy(d: Any, source: str = "policy") -> Policy:
    if not isinstance(d, dict) or not isinstance(d.get("categories"), list) or not d["categories"]:
        raise PolicyError(f"{source}: needs a non-empty list 'categories'")
    known = {"neutral", "caption_weight", "categories", "calibration"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise PolicyError(f"{source}: unknown key(s) {unknown}; valid: {sorted(known)}")
    cats = [_category(c, f"{source}: categories[{i}]") for i, c in enumerate(d["categories"])]
    names = [c.name for c in cats]
    if len(set(names)) != len(names):
        raise PolicyError(f"{source}: duplicate category names in {names}")
    neutral = tuple(_strings(d.get("neutral", list(DEFAULT_NEUTRAL)), f"{source}: neutral"))
    w = float(d.get("caption_weight", 0.5))
    if not 0 <= w <= 1:
        raise PolicyError(f"{source}: caption_weight must be in [0, 1], got {w}")
    extra = {"calibration": d["calibration"]} if "calibration" in d else {}
    return Policy(tuple(cats), neutral, w, extra)


def _category(c: Any, where: str) -> Category:
    if not isinstance(c, dict) or not c.get("name"):
        raise PolicyError(f"{where}: needs a 'name'")
    where = f"{where} ({c['name']})"
    valid = {f.name for f in dataclasses.fields(Category)}
    unknown = sorted(set(c) - valid)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}; valid: {sorted(valid)}")
    prompts = _strings(c.get("prompts"), f"{where}: prompts")
    if not prompts:
        raise PolicyError(f"{where}: needs at least one prompt")
    cat = Category(
        name=str(c["name"]),
        prompts=tuple(prompts),
        negative=tuple(_strings(c.get("negative", []), f"{where}: negative")),
        threshold=float(c.get("threshold", 0.5)),
        review_threshold=None if c.get("review_threshold") is None else float(c["review_threshold"]),
    )
    for v in (cat.threshold, cat.review_threshold):
        if v is not None and not 0 <= v <= 1:
            raise PolicyError(f"{where}: thresholds must be in [0, 1], got {v}")
    return cat


def _strings(v: Any, where: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        raise PolicyError(f"{where}: expected a list of non-empty strings, got {v!r}")
    return v


def load_policy(path: str | os.PathLike) -> Policy:
    """Read a .yaml/.yml (needs pyyaml) or .json policy file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"policy file {p} does not exist")
    text = p.read_text("utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"{p}: not valid YAML ({e})") from e
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{p}: not valid JSON ({e.msg})") from e
    return parse_policy(d, str(p))


def policy_texts(policy: Policy) -> list[str]:
    """Every text a moderator compares items with (neutral, positive and negative prompts), each once."""
    texts = [*policy.neutral]
    for c in policy.categories:
        texts += [*c.prompts, *c.negative]
    return list(dict.fromkeys(texts))


def save_policy(policy: Policy, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        p.write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False, allow_unicode=True))
    else:
        p.write_text(json.dumps(policy.to_dict(), indent=2) + "\n")
    return p


class Moderator:
    """`Moderator(encoder, policy).moderate(images, captions=None)` -> one result dict per item."""

    def __init__(self, model: EncoderSource, policy: Policy | str | os.PathLike) -> None:
        encoder = as_encoder(model)
        policy = policy if isinstance(policy, Policy) else load_policy(policy)
        texts = policy_texts(policy)
        self._setup(policy, dict(zip(texts, encoder.embed_texts(texts))), encoder.logit_scale, encoder)

    @classmethod
    def from_text_vectors(
        cls,
        policy: Policy | str | os.PathLike,
        text_vectors: Mapping[str, np.ndarray],
        logit_scale: float,
    ) -> Moderator:
        """A moderator from the caller's embeddings of `policy_texts(policy)` (text -> (D,) vector). It holds
        no encoder: use `moderate_vectors` / `scores_vectors`."""
        mod = cls.__new__(cls)
        mod._setup(
            policy if isinstance(policy, Policy) else load_policy(policy), text_vectors, logit_scale, None
        )
        return mod

    def _setup(
        self,
        policy: Policy,
        vectors: Mapping[str, np.ndarray],
        logit_scale: float,
        encoder: EncoderLike | None,
    ) -> None:
        missing = [t for t in policy_texts(policy) if t not in vectors]
        if missing:
            raise ValueError(f"no vector for {len(missing)} policy text(s), e.g. {missing[:3]}")
        self.policy, self.scale, self.encoder = policy, float(logit_scale), encoder
        dim = len(vectors[policy.categories[0].prompts[0]])

        def stack(texts: Sequence[str]) -> np.ndarray:  # (K, D); (0, D) for no texts
            return np.asarray([vectors[t] for t in texts], np.float32).reshape(len(texts), dim)

        self._neutral = stack(policy.neutral)
        self._prompts = [(stack(c.prompts), stack(c.negative)) for c in policy.categories]

    def _embed_images(self, images: Sequence[Any]) -> np.ndarray:
        return need_encoder(self.encoder, "moderator").embed_images(list(images))

    # ---- vectors ---------------------------------------------------------------------------------
    def _score(self, feats: np.ndarray) -> tuple[np.ndarray, list[list[list[str]]]]:
        """(N, D) item features -> (N, K categories) scores and, per item and category, the fired prompts."""
        scores = np.zeros((len(feats), len(self.policy.categories)))
        fired: list[list[list[str]]] = [[] for _ in feats]
        for k, (cat, (pos, neg)) in enumerate(zip(self.policy.categories, self._prompts)):
            sp = feats @ pos.T  # (N, P)
            so = feats @ np.concatenate([neg, self._neutral]).T  # (N, Q)
            logits = self.scale * np.concatenate([sp, so], axis=1)
            scores[:, k] = softmax(logits)[:, : sp.shape[1]].sum(axis=1)
            beats = sp > so.max(axis=1, keepdims=True)
            for i in range(len(feats)):
                fired[i].append([cat.prompts[j] for j in np.flatnonzero(beats[i])])
        return scores, fired

    def scores_vectors(
        self, image_vectors: np.ndarray, caption_vectors: Sequence[np.ndarray | None] | None = None
    ) -> dict[str, Any]:
        """(N, D) image vectors and, optionally, one caption vector (or None) per item ->
        {"image": (N, K), "caption": (N, K) or None, "combined": (N, K), "fired_image", "fired_caption"}."""
        feats = np.asarray(image_vectors, np.float32)
        if feats.ndim != 2:
            raise ValueError(f"image vectors must be (N, D), got shape {feats.shape}")
        img, fired_img = self._score(feats)
        out: dict[str, Any] = {"image": img, "caption": None, "combined": img, "fired_image": fired_img}
        out["fired_caption"] = [[[] for _ in self.policy.categories] for _ in feats]
        if caption_vectors is None:
            return out
        if len(caption_vectors) != len(feats):
            raise ValueError(f"{len(caption_vectors)} captions for {len(feats)} items")
        has = [i for i, c in enumerate(caption_vectors) if c is not None]
        if has:
            cap = np.full_like(img, np.nan)
            cap_s, cap_f = self._score(np.stack([caption_vectors[i] for i in has]).astype(np.float32))
            cap[has] = cap_s
            w = self.policy.caption_weight
            combined = img.copy()
            combined[has] = (1 - w) * img[has] + w * cap_s
            for n, i in enumerate(has):
                out["fired_caption"][i] = cap_f[n]
            out.update(caption=cap, combined=combined)
        return out

    def moderate_vectors(
        self, image_vectors: np.ndarray, caption_vectors: Sequence[np.ndarray | None] | None = None
    ) -> list[dict[str, Any]]:
        """Per item: {"decision": allow | review | block, "categories": {name: {"score", "image_score",
        "caption_score", "decision", "fired"}}}."""
        return decisions(self.policy, self.scores_vectors(image_vectors, caption_vectors))

    # ---- images, through the encoder ---------------------------------------------------------------
    def _caption_vectors(
        self, captions: Sequence[str | None] | None, n: int
    ) -> list[np.ndarray | None] | None:
        """One vector (or None for an item without caption) per item; None when there are no captions."""
        if captions is None:
            return None
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} items")
        out: list[np.ndarray | None] = [None] * n
        has = [i for i, c in enumerate(captions) if c]
        if has:
            vectors = need_encoder(self.encoder, "moderator").embed_texts([captions[i] for i in has])
            for i, v in zip(has, vectors):
                out[i] = v
        return out

    def scores(self, images: Sequence[Any], captions: Sequence[str | None] | None = None) -> dict[str, Any]:
        """`scores_vectors` of the images and captions, embedded by the encoder."""
        return self.scores_vectors(self._embed_images(images), self._caption_vectors(captions, len(images)))

    def moderate(
        self, images: Sequence[Any], captions: Sequence[str | None] | None = None
    ) -> list[dict[str, Any]]:
        """`moderate_vectors` of the images and captions, each result with the item's name under "item"."""
        results = decisions(self.policy, self.scores(images, captions))
        return [{"item": str(item), **r} for item, r in zip(images, results)]

    def calibrate(
        self, manifest: str | os.PathLike, precision: float | None = None, recall: float | None = None
    ) -> Policy:
        """A copy of the policy with thresholds fitted on a labelled manifest: lines {"image", "caption"
        (optional), "categories": [names the item belongs to]}. See `calibrated_policy`."""
        if precision is None and recall is None:
            raise ValueError("calibration needs a target precision or recall (or both)")
        rows = read_labelled_manifest(manifest, required=("image", "categories"))
        names = [c.name for c in self.policy.categories]
        for r in rows:
            unknown = [x for x in r["categories"] if x not in names]
            if unknown:
                raise ManifestError(f"{r['_line']}: categories not in the policy: {unknown}; valid: {names}")
        s = self.scores([r["image"] for r in rows], [r.get("caption") for r in rows])["combined"]
        return calibrated_policy(
            self.policy, s, [r["categories"] for r in rows], precision, recall, str(manifest)
        )


def decisions(policy: Policy, s: dict[str, Any]) -> list[dict[str, Any]]:
    """`Moderator.scores_vectors` output -> per item {"decision", "categories"}."""
    results = []
    for i in range(len(s["combined"])):
        cats, decision = {}, "allow"
        for k, c in enumerate(policy.categories):
            v = float(s["combined"][i, k])
            d = "block" if v >= c.threshold else "review" if v >= c.review else "allow"
            cap = None if s["caption"] is None or np.isnan(s["caption"][i, k]) else float(s["caption"][i, k])
            cats[c.name] = {
                "score": v,
                "image_score": float(s["image"][i, k]),
                "caption_score": cap,
                "decision": d,
                "fired": sorted(set(s["fired_image"][i][k]) | set(s["fired_caption"][i][k])),
            }
            decision = max(decision, d, key=("allow", "review", "block").index)
        results.append({"decision": decision, "categories": cats})
    return results


def calibrated_policy(
    policy: Policy,
    scores: np.ndarray,
    categories: Sequence[Sequence[str]],
    precision: float | None,
    recall: float | None,
    source: str,
) -> Policy:
    """A copy of `policy` with thresholds fitted to (N, K) combined scores of items labelled with
    `categories[i]`. `precision` sets each category's block threshold (the loosest reaching that precision);
    `recall` sets its review threshold (the strictest that still sends that fraction of the category's items to
    review or block). The record written under "calibration" is measured on these same items, so it is an
    optimistic estimate; check thresholds on other items before trusting them."""
    cats, record = [], {}
    for k, c in enumerate(policy.categories):
        y = np.array([c.name in labels for labels in categories])
        if not y.any():
            raise ManifestError(f"{source}: no item labelled {c.name!r}; cannot calibrate it")
        block = c.threshold
        if precision is not None:
            t = threshold_for_precision(scores[:, k], y, precision)
            block = 1.0 if t is None else t  # unreachable precision: never block automatically
        review = c.review_threshold
        if recall is not None:
            review = min(threshold_for_recall(scores[:, k], y, recall), block)
        fitted = dataclasses.replace(c, threshold=block, review_threshold=review)
        cats.append(fitted)
        bp, br = precision_recall(scores[:, k], y, block)
        rp, rr = precision_recall(scores[:, k], y, fitted.review)
        record[c.name] = {
            "positives": int(y.sum()),
            "block": {"precision": bp, "recall": br},
            "review_or_block": {"precision": rp, "recall": rr},
        }
    extra = {"calibration": {"manifest": source, "precision": precision, "recall": recall, **record}}
    return dataclasses.replace(policy, categories=tuple(cats), extra=extra)
