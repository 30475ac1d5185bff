"""Duplicates in tiers: the same file, the same photo saved again, and similar shots.

    same-file   identical bytes (the content hash every row already carries)
    same-photo  one picture re-encoded, resized, lightly cropped, mirrored or colour-shifted: a perceptual
                hash within `photo_hamming` bits (mirroring is undone in the hash), or, for crops the hash
                does not survive, an embedding cosine of at least `photo_cosine`
    similar     different pictures of the same scene (a burst, a retake): cosine of at least `similar_cosine`

One threshold on cosine cannot tell these apart: a re-encode and a retake both score 0.95+ with most models.
The hash is the model-independent signal for the middle tier; the defaults are measured for precision on
generated variants of held-out images by bench/dedup_tiers.py.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from clipforge.index.quality import components
from clipforge.index.types import Hit
from clipforge.transforms import ImageError, load_image

if TYPE_CHECKING:
    from clipforge.index import Collection

TIERS = ("same-file", "same-photo", "similar")  # strongest first
_SIDE, _LOW = 32, 8  # the hash reads the 8x8 lowest frequencies of a 32x32 grey thumbnail


@dataclass(frozen=True)
class Thresholds:
    """Where each tier starts. `photo_hamming` (of 63 bits) is the largest distance with precision 1.0 on the
    fit halves of bench/dedup_tiers.py (BENCHMARKS.md). Cosines belong to a model, so `photo_cosine` is off
    until one is measured, and `similar_cosine` is dedup's long-standing 0.95."""

    photo_hamming: int = 10
    photo_cosine: float | None = None  # None: the hash alone decides same-photo
    similar_cosine: float = 0.95

    def __post_init__(self) -> None:
        if not 0 <= self.photo_hamming <= 63:
            raise ValueError(f"photo_hamming is a number of bits in [0, 63], got {self.photo_hamming}")
        for name in ("photo_cosine", "similar_cosine"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise ValueError(f"{name} is a cosine in [-1, 1], got {v}")


@dataclass(frozen=True)
class PHash:
    """A 63-bit DCT perceptual hash of a picture and of its mirror image."""

    bits: int
    mirrored: int

    def distance(self, other: PHash) -> int:
        """Differing bits between the two pictures, allowing one to be the other mirrored."""
        return min((self.bits ^ other.bits).bit_count(), (self.bits ^ other.mirrored).bit_count())


@functools.cache
def _dct(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): row k is the k-th cosine basis vector."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def phash(img: Image.Image) -> PHash:
    """Perceptual hash: grey 32x32 thumbnail, 2-D DCT, the 8x8 lowest frequencies without the mean (DC) term,
    one bit per coefficient above their median. Re-encoding, resizing and small colour changes move few bits;
    a horizontal mirror negates the odd horizontal frequencies, so the mirror's hash comes from the same DCT."""
    g = np.asarray(img.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS), np.float64)
    d = _dct(_SIDE)
    low = (d @ g @ d.T)[:_LOW, :_LOW]  # (v, u): vertical, horizontal frequency
    mirror = low * np.where(np.arange(_LOW) % 2, -1.0, 1.0)[None, :]
    return PHash(_bits(low), _bits(mirror))


def _bits(c: np.ndarray) -> int:
    x = c.reshape(-1)[1:]  # 63 coefficients: the DC term only says how bright the picture is
    on = x > np.median(x)
    return int(sum(1 << i for i in np.flatnonzero(on)))


_NONE = len(TIERS)  # tier code of a pair that is no kind of duplicate
_NO_HASH = 64  # hash distance standing for "a side has no hash": beyond any threshold (at most 63)


def tier_codes(same_bytes: np.ndarray, cosine: np.ndarray, distance: np.ndarray, t: Thresholds) -> np.ndarray:
    """The rules, on arrays of pairs: index into TIERS, or len(TIERS) for no duplicate. `distance` is the
    hash distance, 64 where a side has no hash (a caption, a video frame, a file gone)."""
    photo = distance <= t.photo_hamming
    if t.photo_cosine is not None:
        photo = photo | (cosine >= t.photo_cosine)
    return np.select([same_bytes, photo, cosine >= t.similar_cosine], [0, 1, 2], _NONE)


def tier(same_bytes: bool, cosine: float, distance: int | None, t: Thresholds = Thresholds()) -> str | None:
    """The tier of one pair (`distance` None when a side has no hash); None when it is no duplicate."""
    d = _NO_HASH if distance is None else distance
    code = int(tier_codes(np.array(same_bytes), np.array(cosine), np.array(d), t))
    return TIERS[code] if code < _NONE else None


def tiered_groups(n: int, pairs: Sequence[tuple[int, int, str]]) -> list[list[tuple[int, str | None]]]:
    """Groups (connected components, size >= 2) of items 0..n-1 linked by tiered `pairs` (a, b, tier).
    Each group is [(anchor, None), (member, tier), ...] with the anchor its lowest index and a member's tier
    the strongest tier whose links alone connect it to the anchor (so a chain of re-encodes stays
    same-photo, while anything reached through a similar shot is similar)."""
    edges = [
        np.array([(a, b) for a, b, t in pairs if TIERS.index(t) <= lvl], np.int64).reshape(-1, 2)
        for lvl in range(3)
    ]
    root_at = [_roots(n, components(n, e)) for e in edges]
    out = []
    for comp in components(n, edges[-1]):
        anchor = comp[0]
        members = [(anchor, None)]
        for m in comp[1:]:
            lvl = next(lv for lv in range(3) if root_at[lv].get(m, -1) == root_at[lv].get(anchor, -2))
            members.append((m, TIERS[lvl]))
        out.append(members)
    return out


def _roots(n: int, comps: Iterable[list[int]]) -> dict[int, int]:
    return {m: c[0] for c in comps for m in c}


@dataclass(frozen=True)
class Member:
    """One item of a duplicate group: its row (score: cosine to the anchor) and its tier (None: the anchor)."""

    hit: Hit
    tier: str | None


def find_duplicates(
    coll: Collection, thresholds: Thresholds = Thresholds(), neighbours: int = 16, partners: int = 32
) -> list[list[Member]]:
    """Groups of duplicates in a collection, each member labelled with its tier relative to the group's anchor
    (its lowest id). Candidates are the groups `Collection.dedup` finds at the lowest cosine of any tier
    (`neighbours` nearest per item). Inside a group each member keeps its `partners` strongest links (every
    link in a group of up to partners + 1); only group members' files are read, at 1/8 scale where JPEG
    allows, for the hash."""
    floor = min(
        thresholds.similar_cosine, thresholds.photo_cosine if thresholds.photo_cosine is not None else 1.0
    )
    out = []
    for group in coll.dedup(floor, neighbours):
        vecs = coll.vectors(np.array([h.id for h in group], np.int64))  # (m, D), unit rows
        pairs = _links(group, vecs, [_file_hash(h.path) for h in group], thresholds, partners)
        out += [[Member(group[i], t) for i, t in g] for g in tiered_groups(len(group), pairs)]
    return out


_BLOCK = 512  # rows of a group compared at once: memory O(_BLOCK * m), whatever the group's size m
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _links(
    group: list[Hit], vecs: np.ndarray, hashes: list[PHash | None], t: Thresholds, partners: int
) -> list[tuple[int, int, str]]:
    """(a, b, tier) for each member's `partners` strongest links (by tier, then cosine) within the group."""
    m = len(group)
    has = np.array([h is not None for h in hashes])
    bits = np.array([h.bits if h else 0 for h in hashes], np.uint64)
    mirrored = np.array([h.mirrored if h else 0 for h in hashes], np.uint64)
    # Only a file's content hash can make two rows the same file; captions share none.
    sha = np.array([h.sha256 if h.path is not None and h.sha256 else f"row {i}" for i, h in enumerate(group)])
    links = set()
    for start in range(0, m, _BLOCK):
        rows = np.arange(start, min(m, start + _BLOCK))
        cos = vecs[rows] @ vecs.T  # (b, m)
        dist = np.minimum(
            _popcount(bits[rows, None] ^ bits[None]), _popcount(bits[rows, None] ^ mirrored[None])
        )
        dist[~(has[rows, None] & has[None])] = _NO_HASH
        code = tier_codes(sha[rows, None] == sha[None], cos, dist, t)
        code[np.arange(len(rows)), rows] = _NONE  # an item is not its own duplicate
        best = np.lexsort((-cos, code), axis=1)[:, :partners]  # strongest tier first, then highest cosine
        for r, cols in zip(rows, best):
            for c in cols[code[r - start, cols] < _NONE]:
                a, b = sorted((int(r), int(c)))
                links.add((a, b, TIERS[code[r - start, c]]))
    return sorted(links)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 1.24 has no bitwise_count)."""
    return _POPCOUNT[x[..., None].view(np.uint8)].sum(-1, dtype=np.int64)


def _file_hash(path: str | None) -> PHash | None:
    """The hash of a row's file; None for captions, video frames (`path#t=`) and files gone or unreadable."""
    if path is None or not os.path.isfile(path):
        return None
    try:
        return phash(load_image(path, draft_size=2 * _SIDE))
    except ImageError:
        return None
