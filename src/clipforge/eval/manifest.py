"""Labelled JSON-lines manifests as the evaluators and calibrators read them: one object per line, an "image"
path relative to the manifest's folder (or absolute), plus whatever the task needs ("label", "caption",
"tags", "categories"). Training data (images and captions only) is read by clipforge.data.manifest instead;
both raise the same `ManifestError`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data.manifest import ManifestError

__all__ = ["ManifestError", "captions_of", "read_labelled_manifest"]


def read_labelled_manifest(
    path: str | os.PathLike, required: Sequence[str] = ("image",)
) -> list[dict[str, Any]]:
    """Rows with "image" resolved to a path string; every key in `required` must be present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise ManifestError(f"{path}:{i}: missing key(s) {missing}")
        if "image" in row:
            row["image"] = str(path.parent / row["image"])
        row["_line"] = f"{path}:{i}"
        rows.append(row)
    if not rows:
        raise ManifestError(f"manifest {path} has no rows")
    return rows


def captions_of(row: dict[str, Any]) -> list[str]:
    """A row's "caption" (a string or a list) or "captions", as a non-empty list of strings."""
    value = row.get("caption", row.get("captions"))
    caps = [value] if isinstance(value, str) else list(value or [])
    if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise ManifestError(f'{row["_line"]}: needs a non-empty "caption" (a string or a list of strings)')
    return caps
