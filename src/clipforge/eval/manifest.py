"""Manifests as the evaluators and calibrators read them: rows (dicts) of the samples that
`clipforge.data.sources` reads, so an evaluation sees exactly the samples training and indexing see.

A row holds the sample's metadata ("label", "tags", "categories", ...), plus "key" (the sample's), "image"
(an absolute path, or the encoded bytes of a shard member), "captions" and "caption" (all captions and the first, when it has
any) and "_line" (file and line, for messages). Any source `sources` reads works: JSON lines, CSV/TSV, a
folder of images with sidecars, shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from clipforge.data.sample import Sample
from clipforge.data.sample import SourceError as ManifestError
from clipforge.data.sources import iter_samples

__all__ = ["ManifestError", "captions_of", "read_labelled_manifest"]


def _row(s: Sample) -> dict[str, Any]:
    image = s.image if isinstance(s.image, str) else s.read()
    row = {**s.metadata, "key": s.key, "image": image, "_line": s.origin}
    if s.captions:
        row["captions"], row["caption"] = list(s.captions), s.captions[0]
    return row


def read_labelled_manifest(
    path: str | os.PathLike, required: Sequence[str] = ("image",)
) -> list[dict[str, Any]]:
    """Rows of every sample of `path`; each key in `required` must be present (ManifestError naming the
    file and line otherwise)."""
    rows = []
    for s in iter_samples(path):
        row = _row(s)
        missing = [k for k in required if k not in row]
        if missing:
            raise ManifestError(f"{s.origin}: missing key(s) {missing}")
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def captions_of(row: dict[str, Any]) -> list[str]:
    """A row's captions (the caption rule of `clipforge.data.sample`), as a non-empty list."""
    if not row.get("captions"):
        raise ManifestError(f'{row["_line"]}: needs a caption ("captions", "caption" or "text")')
    return list(row["captions"])
