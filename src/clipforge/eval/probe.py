"""Linear probe on frozen image features: scikit-learn logistic regression (the paper's linear probe), with
the inverse regularisation C picked by cross-validation on the training set when not given. The few-shot
head initialised from the text classifier is `clipforge.zeroshot.fit_text_head`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.encoder import EncoderSource, as_encoder
from clipforge.eval.classification import classification_metrics
from clipforge.eval.manifest import read_labelled_manifest

C_GRID = (0.1, 1.0, 10.0, 100.0)


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, C: float | None = None, seed: int = 0) -> Any:
    """A fitted sklearn LogisticRegression; C from a 3-fold search over C_GRID when None."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    if C is None:
        fewest = int(np.bincount(targets).min()) if len(targets) else 0
        if fewest >= 3:
            scores = [
                cross_val_score(LogisticRegression(C=c, max_iter=2000), features, targets, cv=3).mean()
                for c in C_GRID
            ]
            C = C_GRID[int(np.argmax(scores))]
        else:
            C = 10.0  # too few examples per class to cross-validate; features are unit vectors, so C is large
    return LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(features, targets)


def linear_probe_eval(
    encoder: EncoderSource,
    train_manifest: str | os.PathLike,
    test_manifest: str | os.PathLike,
    C: float | None = None,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Logistic regression on the train manifest's features, scored on the test manifest: the same keys as
    the zero-shot evaluation ({"top1", "top5", "mean_per_class_recall", "n"}) plus "C"."""
    enc = as_encoder(encoder)
    train = read_labelled_manifest(train_manifest, required=("image", "label"))
    test = read_labelled_manifest(test_manifest, required=("image", "label"))
    classes = sorted({str(r["label"]) for r in train})
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({str(r["label"]) for r in test} - set(index))
    if unseen:
        raise ValueError(f"{test_manifest}: labels {unseen[:5]} never occur in the training manifest")
    x_train = enc.embed_images([r["image"] for r in train])
    y_train = np.array([index[str(r["label"])] for r in train])
    images = [r["image"] for r in test]
    y_test = np.array([index[str(r["label"])] for r in test])
    probe = fit_linear_probe(x_train, y_train, C)
    probs = np.zeros((len(test), len(classes)))
    probs[:, probe.classes_] = probe.predict_proba(enc.embed_images(images))
    metrics: dict[str, Any] = {
        **classification_metrics(probs, y_test),
        "classes": len(classes),
        "n_train": len(train),
        "C": float(probe.C),
    }
    if out_dir is not None:
        from clipforge.eval import report

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        pictures = report.classification_pictures(out, "linear_probe", classes, y_test, probs, images)
        notes = (
            f"Logistic regression (C={probe.C:g}) on frozen image features of {len(train)} training images."
        )
        report.write_report(out, "linear_probe", "Linear probe", metrics, pictures, notes)
    return metrics
