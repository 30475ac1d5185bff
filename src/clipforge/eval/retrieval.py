"""Image-text retrieval recall@K in both directions, with one or many captions per image.

Manifest lines: {"image": "relative/path.png", "caption": "text"} or {"caption": ["text", ...]}.
- image -> text: an image counts at K when any of its captions is among the K captions most similar to it;
- text -> image: each caption counts at K when its image is among the K images most similar to it.
Ties count in the item's favour (a rank is the number of strictly better candidates), which matters only for
degenerate encoders.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.encoder import EncoderSource, as_encoder
from clipforge.eval.manifest import captions_of, read_labelled_manifest

KS = (1, 5, 10)


def retrieval_ranks(sims: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sims: (N images, M texts); owner[j] = the image of text j.
    Returns (rank of each image's best caption (N,), rank of each text's image (M,)), 0 = first."""
    n = sims.shape[0]
    mine = owner[None, :] == np.arange(n)[:, None]  # (N, M): text j belongs to image i
    best = np.where(mine, sims, -np.inf).max(axis=1)  # (N,) similarity of the best own caption
    i2t = (sims > best[:, None]).sum(axis=1)
    own = sims[owner, np.arange(sims.shape[1])]  # (M,) similarity of each text to its image
    t2i = (sims > own[None, :]).sum(axis=0)
    return i2t, t2i


def recall_metrics(sims: np.ndarray, owner: np.ndarray) -> dict[str, float | int]:
    i2t, t2i = retrieval_ranks(sims, owner)
    out: dict[str, float | int] = {}
    for k in KS:
        out[f"image_to_text_R@{k}"] = float((i2t < k).mean())
    for k in KS:
        out[f"text_to_image_R@{k}"] = float((t2i < k).mean())
    out["n_images"], out["n_texts"] = int(sims.shape[0]), int(sims.shape[1])
    return out


def retrieval_eval(
    encoder: EncoderSource, manifest: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """{"image_to_text_R@1", ..., "text_to_image_R@10", "n_images", "n_texts"} as fractions. With `out_dir`,
    also retrieval.json, retrieval.md and pictures there."""
    enc = as_encoder(encoder)
    rows = read_labelled_manifest(manifest, required=("image",))
    caps = [captions_of(r) for r in rows]
    texts = [c for cs in caps for c in cs]
    owner = np.array([i for i, cs in enumerate(caps) for _ in cs])
    images = [r["image"] for r in rows]
    sims = enc.embed_images(images) @ enc.embed_texts(texts).T  # (N, M)
    metrics = recall_metrics(sims, owner)
    if out_dir is not None:
        _write(Path(out_dir), images, texts, owner, sims, metrics)
    return metrics


def _write(
    out: Path,
    images: list[str],
    texts: list[str],
    owner: np.ndarray,
    sims: np.ndarray,
    metrics: dict[str, Any],
) -> None:
    from clipforge.eval import report

    out.mkdir(parents=True, exist_ok=True)
    sample = list(range(min(8, len(images))))
    first_caption = [int(np.flatnonzero(owner == i)[0]) for i in sample]
    pictures = {
        "Similarity of images and their first captions": report.plot_similarity(
            [images[i] for i in sample],
            [texts[j] for j in first_caption],
            sims[np.ix_(sample, first_caption)].T,
            out / "retrieval_similarity.png",
        )
    }
    # Top mistakes: images whose best caption belongs to another image, most confident first.
    top = sims.argmax(axis=1)
    wrong = np.flatnonzero(owner[top] != np.arange(len(images)))
    wrong = wrong[np.argsort(-sims[wrong, top[wrong]], kind="stable")][:12]
    mistakes = [
        (images[i], texts[int(np.flatnonzero(owner == i)[0])], texts[top[i]], float(sims[i, top[i]]))
        for i in wrong
    ]
    pictures["Top mistakes (image to text)"] = report.plot_mistakes(mistakes, out / "retrieval_mistakes.png")
    notes = (
        f"{metrics['n_images']} images, {metrics['n_texts']} captions. Mistakes show an image's own first "
        "caption as 'true' and the retrieved caption as 'pred' with its cosine similarity. Retrieval has no "
        "classes, so there is no confusion matrix or per-class accuracy."
    )
    report.write_report(out, "retrieval", "Image-text retrieval", metrics, pictures, notes)
