"""Image-caption manifests: which image goes with which captions.

Three local layouts are read into a list of `Sample`s (shards are in `shards.py`):

- JSON lines (`.jsonl`): one object per line with `"image"` (a path) and `"caption"` (a string or a list)
  or `"captions"` (a list); an optional `"key"` names the sample (else its image path does).
- CSV / TSV (`.csv`, `.tsv`): a header row; the image column is `image` (or `filepath`, `path`, `file`);
  every column whose name starts with `caption` holds captions, and a cell may hold several separated by
  `|`. Standard quoting applies, so a caption may contain the delimiter.
- A folder of images, each with a same-named `.txt` file (`cat.jpg` + `cat.txt`); each non-empty line of
  the text file is one caption. Sub-folders are searched too.

Manifests are UTF-8 text (a byte-order mark is allowed). Relative image paths are relative to the manifest's
folder. Several rows naming the same image (one row
per caption) are merged into one sample with all their captions. Structural problems (bad JSON, no image
column) raise `ManifestError` naming the file and line; problems with one sample's content (a missing
image file, no caption) are left to the loader, which skips and counts them.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "filepath", "path", "file")
CAPTION_SEPARATOR = "|"  # between several captions in one CSV/TSV cell


class ManifestError(ValueError):
    """A manifest that cannot be read: unknown format, bad JSON, missing columns or keys."""


class SampleError(ValueError):
    """One sample that cannot be used (no caption, no image in a shard record); the loader skips it."""


@dataclass(frozen=True)
class Sample:
    """One image and every caption written for it. `key` is unique within a manifest."""

    key: str
    image: str  # absolute path, or a URL as written in the manifest
    captions: tuple[str, ...]


def clean_captions(raw: object, where: str) -> tuple[str, ...]:
    """A caption field (None, a string or a list of strings) -> non-empty stripped captions."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(c, str) for c in raw):
        raise ManifestError(f"{where}: captions must be a string or a list of strings, got {raw!r:.80}")
    return tuple(c.strip() for c in raw if c.strip())


def _resolve(image: str, base: Path) -> str:
    if "://" in image or os.path.isabs(image):
        return image
    return str(base / image)


def read_manifest(path: str | Path) -> list[Sample]:
    """Samples of a `.jsonl`, `.csv` or `.tsv` manifest, or of a folder of images with `.txt` captions."""
    p = Path(path)
    if p.is_dir():
        return read_folder(p)
    if not p.exists():
        raise FileNotFoundError(f"manifest not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        samples = read_jsonl(p)
    elif suffix in (".csv", ".tsv"):
        samples = read_table(p, delimiter="\t" if suffix == ".tsv" else ",")
    else:
        raise ManifestError(f"{p}: unknown manifest type {suffix!r}; valid: {', '.join(MANIFEST_SUFFIXES)}")
    if not samples:
        raise ManifestError(f"{p}: no samples")
    return _merge(samples, str(p))


def _not_utf8(where: str, e: UnicodeDecodeError) -> ManifestError:
    return ManifestError(f"{where}: not UTF-8 text ({e.reason}); save the manifest as UTF-8")


def read_jsonl(path: Path) -> list[Sample]:
    base = path.parent.resolve()
    out = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a decoding error names its line
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(where, e) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ManifestError(f'{where}: each line needs an "image" path (a string)')
            if "captions" in row:
                caps = clean_captions(row["captions"], where)
            else:
                caps = clean_captions(row.get("caption"), where)
            key = str(row.get("key", row["image"]))
            out.append(Sample(key, _resolve(row["image"], base), caps))
    return out


def read_table(path: Path, delimiter: str) -> list[Sample]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            return _table_samples(path, reader)
        except UnicodeDecodeError as e:
            raise _not_utf8(f"{path}: near line {reader.line_num + 1}", e) from None
        except csv.Error as e:
            raise ManifestError(f"{path}:{reader.line_num}: {e}") from None


def _table_samples(path: Path, reader) -> list[Sample]:
    """Samples of a CSV/TSV table from its reader (header row first)."""
    base = path.parent.resolve()
    header = next(reader, None)
    if header is None:
        raise ManifestError(f"{path}: empty file (a header row is needed)")
    names = [h.strip().lower() for h in header]
    image_col = next((names.index(c) for c in IMAGE_COLUMNS if c in names), None)
    caption_cols = [i for i, h in enumerate(names) if h.startswith("caption")]
    if image_col is None or not caption_cols:
        raise ManifestError(
            f"{path}: header {header} needs an image column (one of {IMAGE_COLUMNS}) "
            "and at least one column whose name starts with 'caption'"
        )
    key_col = names.index("key") if "key" in names else image_col
    out = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            raise ManifestError(f"{where}: {len(row)} fields, the header has {len(header)}")
        caps = [c for i in caption_cols for c in row[i].split(CAPTION_SEPARATOR)]
        image = row[image_col].strip()
        if not image:
            raise ManifestError(f"{where}: empty image path")
        out.append(Sample(row[key_col].strip(), _resolve(image, base), clean_captions(caps, where)))
    return out


def read_folder(folder: str | Path) -> list[Sample]:
    """Images under `folder` (recursively, sorted) with the captions of their same-named `.txt` files.
    An image without a `.txt` file gets no captions (the loader counts it as bad)."""
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ManifestError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    out = []
    for img in images:
        txt = img.with_suffix(".txt")
        lines = txt.read_text(encoding="utf-8").splitlines() if txt.is_file() else []
        out.append(
            Sample(img.relative_to(root).as_posix(), str(img.resolve()), clean_captions(lines, str(txt)))
        )
    return out


def _merge(samples: list[Sample], where: str) -> list[Sample]:
    """Rows naming the same key (one row per caption, as COCO-style files have) become one sample with all
    their captions, in file order; the first row's position is kept."""
    merged: dict[str, Sample] = {}
    for s in samples:
        prev = merged.get(s.key)
        if prev is None:
            merged[s.key] = s
        elif prev.image != s.image:
            raise ManifestError(f"{where}: key {s.key!r} names two images: {prev.image} and {s.image}")
        else:
            merged[s.key] = Sample(s.key, s.image, prev.captions + s.captions)
    return list(merged.values())
