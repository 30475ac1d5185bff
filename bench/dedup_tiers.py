"""Duplicate tiers: precision and recall of each tier on generated variants of held-out images.

Each base image gives a byte copy (same-file), five variants of the same photo (JPEG re-encode at quality 50,
resize to 1/3, a 5% crop off every side, a mirror, a colour and brightness shift), and two near shots of
its scene (overlapping views 20% apart, slightly turned, one brighter: similar to each other). Every pair of
items is scored; a near shot against its own base or variants is ambiguous and left out, pairs of different
bases are unrelated. Images are split in two halves: thresholds are fitted on the first (the largest hash
distance, or the smallest cosine, reaching the target precision) and reported on the second, next to the
library's defaults. Without `--model` only the hash-based tiers are measured.

Images: the open corpus's held-out drawings (`clipforge.paths.corpus_dir()`, when built) and synthetic
photo-like pictures (bench/jpeg_draft.py), in separate tables: drawings on white collide more.

    python bench/dedup_tiers.py [--images 80] [--model PATH] [--target 0.99] [--source corpus,synthetic]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average  # noqa: E402
from jpeg_draft import make_photo  # noqa: E402

from clipforge import paths  # noqa: E402
from clipforge.media.duplicates import TIERS, Thresholds, phash, tier  # noqa: E402
from clipforge.transforms import load_image  # noqa: E402

VARIANTS = ("copy", "re-encode", "resize", "crop", "mirror", "colour")
SHOTS = ("shot-a", "shot-b")


@dataclass
class Item:
    base: int
    kind: str  # "original", a VARIANTS name or a SHOTS name
    data: bytes

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, quality=quality)
    return b.getvalue()


def items_of(base: int, img: Image.Image) -> list[Item]:
    w, h = img.size
    png = encode(img)
    out = {
        "original": png,
        "copy": png,
        "re-encode": encode(img, "JPEG", 50),
        "resize": encode(img.resize((w // 3, h // 3), Image.Resampling.BILINEAR)),
        "crop": encode(img.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
        "mirror": encode(ImageOps.mirror(img)),
        "colour": encode(ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.15)).enhance(1.3)),
        # Near shots: two views 20% apart, each slightly turned; one brighter (the light changed).
        "shot-a": encode(img.crop((0, 0, w * 4 // 5, h * 4 // 5)).rotate(3, fillcolor="white")),
        "shot-b": encode(
            ImageEnhance.Brightness(img.crop((w // 5, h // 5, w, h)).rotate(-3, fillcolor="white")).enhance(
                1.1
            )
        ),
    }
    return [Item(base, k, v) for k, v in out.items()]


def truth(a: Item, b: Item) -> str | None:
    """'same-file', 'same-photo', 'similar', 'unrelated', or None (ambiguous: left out)."""
    if a.sha == b.sha:  # the copy; also the mirror of a symmetric drawing
        return "same-file"
    if a.base != b.base:
        return "unrelated"
    shots = (a.kind in SHOTS) + (b.kind in SHOTS)
    return "same-photo" if shots == 0 else "similar" if shots == 2 else None


def corpus_images(n: int, seed: int) -> list[Image.Image]:
    root = paths.corpus_dir()
    rows = [json.loads(line) for line in (root / "heldout.jsonl").read_text().splitlines()]
    random.Random(seed).shuffle(rows)
    # One image per concept: the same emoji in another skin tone or by another source is the same picture
    # colour-shifted or redrawn, which would count as a false pair between "different" bases.
    # The corpus also holds a few byte-identical drawings under different concepts: kept once.
    first = {r["concept"]: r for r in reversed(rows)}
    files = {hashlib.sha256((root / r["image"]).read_bytes()).digest(): r for r in first.values()}
    return [load_image(root / r["image"]) for r in list(files.values())[:n]]


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    return [make_photo(320, 240, seed * 1000 + i) for i in range(n)]


def score(items: list[Item], vectors: np.ndarray | None):
    """Per evaluated pair: truth, same bytes, hash distance, cosine (nan without a model)."""
    hashes = [phash(load_image(it.data, draft_size=64)) for it in items]
    cos = vectors @ vectors.T if vectors is not None else None
    rows = []
    for i in range(len(items)):
        for j in range(i):
            t = truth(items[i], items[j])
            if t is not None:
                c = float(cos[i, j]) if cos is not None else float("nan")
                rows.append(
                    (
                        t,
                        items[i].sha == items[j].sha,
                        hashes[i].distance(hashes[j]),
                        c,
                        items[i].kind,
                        items[j].kind,
                    )
                )
    return rows


def fit_hamming(rows, target: float) -> int:
    best = 0
    for h in range(0, 33):
        hit = [r[0] == "same-photo" for r in rows if not r[1] and r[2] <= h]
        if hit and np.mean(hit) >= target:
            best = h
    return best


def fit_cosine(rows, target: float, related: set[str]) -> float | None:
    """The smallest cosine c such that pairs at or above c (bytes differing) are `related` with `target`
    precision; None when no cut reaches it."""
    pairs = sorted(((r[3], r[0] in related) for r in rows if not r[1]), reverse=True)
    good, best = 0, None
    for n, (c, ok) in enumerate(pairs, 1):
        good += ok
        if good / n >= target:
            best = c
    return best


def report(rows, t: Thresholds, label: str) -> None:
    got = [(r, tier(r[1], r[3] if r[3] == r[3] else -1.0, r[2], t)) for r in rows]  # nan: no model
    print(
        f"\n{label}: photo_hamming={t.photo_hamming}, photo_cosine={t.photo_cosine}, similar={t.similar_cosine}"
    )
    print("| tier | pairs found | precision | true pairs | recall |")
    print("|---|---|---|---|---|")
    for name in TIERS:
        # A pair found as 'similar' is right when the two are related at all; recall counts a true pair found
        # at its tier or a stronger one.
        right = {name, "same-photo"} if name == "similar" else {name}
        pred = [r for r, p in got if p == name]
        true = [p for r, p in got if r[0] == name]
        found = sum(p is not None and TIERS.index(p) <= TIERS.index(name) for p in true)
        prec = np.mean([r[0] in right for r in pred]) if pred else float("nan")
        rec = found / len(true) if true else float("nan")
        print(f"| {name} | {len(pred)} | {prec:.3f} | {len(true)} | {rec:.3f} |")
    per_variant = []
    for v in VARIANTS[1:]:
        sel = [p for r, p in got if r[0] == "same-photo" and "original" in r[4:] and v in r[4:]]
        per_variant.append(f"{v} {np.mean([p == 'same-photo' for p in sel]):.2f}")
    print("same-photo recall against the original, by variant: " + ", ".join(per_variant))


def hash_table(halves) -> None:
    """Precision and recall of 'hash distance <= h' for same-photo, per half, over a range of h."""
    print("\n| photo_hamming | " + " | ".join(f"{n} precision | {n} recall" for n in ("fit", "test")) + " |")
    print("|---" * 5 + "|")
    for h in range(4, 19, 2):
        cells = []
        for rows in halves:
            pred = [r[0] == "same-photo" for r in rows if r[0] != "same-file" and r[2] <= h]
            true = [r[2] <= h for r in rows if r[0] == "same-photo"]
            cells += [f"{np.mean(pred):.3f}", f"{np.mean(true):.3f}"]
        print(f"| {h} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=80, help="base images per source (half fit, half test)")
    p.add_argument("--model", default=None, help="a clipforge model folder for the cosine tiers")
    p.add_argument("--target", type=float, default=0.99, help="precision the fitted thresholds must reach")
    p.add_argument("--source", default="corpus,synthetic")
    a = p.parse_args()
    enc = None
    if a.model:
        from clipforge.encoder import Encoder

        enc = Encoder.load(a.model)
    print(f"load: {load_average()}; {a.images} base images per source, target precision {a.target}")
    for source in a.source.split(","):
        images = corpus_images(a.images, 0) if source == "corpus" else synthetic_images(a.images, 0)
        halves = []
        for half in (images[0::2], images[1::2]):
            items = [it for b, img in enumerate(half) for it in items_of(b, img)]
            vecs = enc.embed_images([it.data for it in items]) if enc is not None else None
            halves.append(score(items, vecs))
        fit, test = halves
        h = fit_hamming(fit, a.target)
        photo = fit_cosine(fit, a.target, {"same-photo", "same-file"}) if enc else None
        similar = fit_cosine(fit, a.target, {"same-photo", "same-file", "similar"}) if enc else None
        print(
            f"\n## {source}: {len(images) // 2} + {len(images) - len(images) // 2} base images, {len(test)} test pairs"
        )
        print(f"fitted on the first half: photo_hamming={h}, photo_cosine={photo}, similar_cosine={similar}")
        hash_table(halves)
        fitted = Thresholds(h, photo, similar if similar is not None else Thresholds().similar_cosine)
        report(test, fitted, "fitted thresholds, second half")
        report(test, Thresholds(), "library defaults, second half")


if __name__ == "__main__":
    main()
