"""Fitting a collection's relevance calibration (relevance.py) from labelled searches.

A labelled search is a caption whose label (a concept, a class) is known, searched in a collection whose rows
carry labels in their metadata: each of its top-k vector hits is relevant when the hit's label equals the
query's. The hits' chance excess and those labels are what `relevance.fit` regresses on. Queries whose label
no row carries are left out (nothing could be relevant, which says nothing about the scores).

`clipforge index calibrate COLLECTION QUERIES.jsonl --label concept` runs this; `--save-model` also writes the
fit into the model's folder (relevance.json), from where `index create` copies it into new collections.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np

from clipforge.atomic import write_atomic
from clipforge.data.sources import read_manifest

from . import rank
from .relevance import Calibration, chance_excess, fit, log_loss
from .store import Store
from .types import CollectionError, EncoderLike

K = 10
MAX_QUERIES = 2000
MODEL_FILE = "relevance.json"  # in a model's folder, beside its weights


def read_queries(path: Path, label: str, limit: int = MAX_QUERIES, seed: int = 0) -> list[tuple[str, str]]:
    """(caption, label) pairs from a manifest (JSONL, CSV or TSV rows with an image, captions and a `label`
    field, as `clipforge train` reads them): one caption drawn per row (seeded), no caption twice, up to
    `limit` drawn evenly over the file. A row without captions or without a string label is a named error."""
    rows = read_manifest(path)
    for s in rows:
        if not s.captions:
            raise ValueError(f"{s.origin}: a calibration query needs a caption")
        if not isinstance(s.metadata.get(label), str) or not s.metadata[label]:
            raise ValueError(f"{s.origin}: needs a string {label!r} (the query's label)")
    rng = random.Random(seed)
    rng.shuffle(rows)
    out: dict[str, str] = {}
    for s in rows:
        out.setdefault(rng.choice(s.captions), s.metadata[label])
        if len(out) >= limit:
            break
    return list(out.items())


def labelled_hits(
    store: Store, vectors: np.ndarray, labels: list[str], label: str, k: int = K
) -> tuple[np.ndarray, np.ndarray, int]:
    """The chance excess (n,) of each query's top-k vector hits and whether each hit is relevant (n,), and
    how many queries were used (those whose label some row carries)."""
    row_labels: dict[int, object] = {}
    ids = store.all_ids()
    for s in range(0, len(ids), 4096):
        chunk = ids[s : s + 4096]
        for h in store.hits(np.zeros(len(chunk), np.float32), chunk):
            row_labels[h.id] = (h.metadata or {}).get(label)
    present = set(row_labels.values())
    keep = [i for i, lab in enumerate(labels) if lab in present]
    if not keep:
        raise CollectionError(
            f"no row of {store.path} carries a {label!r} that a query has: nothing to fit on"
        )
    background = rank.background_sample(store, None)
    scores, hit_ids = store.search_batch(vectors[keep], k)
    excess, relevant = [], []
    for j, q, s, found in zip(keep, vectors[keep], scores, hit_ids):
        s, found = s[found >= 0], found[found >= 0]
        x = chance_excess(s, background @ q, len(store))
        if x is None:
            raise CollectionError(f"{store.path} is too small to estimate relevance ({len(store)} rows)")
        excess.append(x)
        relevant += [row_labels.get(int(i)) == labels[j] for i in found]
    return np.concatenate(excess), np.array(relevant, bool), len(keep)


def calibrate(
    store: Store, encoder: EncoderLike, queries: list[tuple[str, str]], label: str, k: int = K
) -> tuple[Calibration, dict]:
    """Fit `store`'s relevance calibration on labelled `queries` (read_queries) embedded by `encoder`; returns
    it (not yet stored) and a report: queries and hits used, the share relevant, the log-loss of the fit and
    of the mapping the collection uses now, both on these same hits (in-sample)."""
    vectors = encoder.embed_texts([t for t, _ in queries])
    excess, relevant, used = labelled_hits(store, vectors, [lab for _, lab in queries], label, k)
    fitted = {
        "fingerprint": store.identity.get("fingerprint"),
        "queries": used,
        "hits": int(len(relevant)),
        "k": k,
        "label": label,
    }
    cal = fit(excess, relevant, fitted)
    report = {
        **fitted,
        "relevant_share": float(relevant.mean()),
        "margin": cal.margin,
        "scale": cal.scale,
        "log_loss_fit": log_loss(cal(excess), relevant),
        "log_loss_before": log_loss(store.relevance(excess), relevant),
    }
    return cal, report


def write_model_file(encoder: EncoderLike, calibration: Calibration) -> Path:
    """Store `calibration` in the encoder's model folder (relevance.json), atomically."""
    folder = model_folder(encoder)
    if folder is None:
        name = encoder.identity.get("model", "this model")
        raise CollectionError(f"{name} was not loaded from a model folder: nowhere to store {MODEL_FILE}")
    path = folder / MODEL_FILE
    text = json.dumps(calibration.to_dict(), indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()), error=CollectionError)
    return path


def read_model_file(model_dir: Path, fingerprint: str) -> Calibration | None:
    """The calibration stored in a model's folder, if it has one fitted for these weights (`fingerprint`);
    a file fitted for other weights is refused by name."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CollectionError(f"cannot read {path}: {e}") from None
    cal = Calibration.from_dict(d, str(path))
    if (cal.fitted or {}).get("fingerprint") != fingerprint:
        raise CollectionError(
            f"{path} was fitted for other weights (fingerprint {(cal.fitted or {}).get('fingerprint')!r}, "
            f"the model's is {fingerprint!r}); fit it again with `clipforge index calibrate --save-model`"
        )
    return cal


def model_folder(encoder: EncoderLike) -> Path | None:
    """The folder the encoder's model was loaded from (clipforge.encoder.Encoder.folder), if any."""
    folder = getattr(encoder, "folder", None)
    return Path(folder) if folder is not None and Path(folder).is_dir() else None


def model_calibration(encoder: EncoderLike) -> Calibration | None:
    """The calibration in the encoder's model folder fitted for these weights, if there is one. One fitted for
    other weights (the model was retrained since) is a warning and no calibration, not a stop."""
    folder = model_folder(encoder)
    if folder is None:
        return None
    try:
        return read_model_file(folder, encoder.identity["fingerprint"])
    except CollectionError as e:
        warnings.warn(f"{e}; using the fixed relevance mapping", stacklevel=2)
        return None
