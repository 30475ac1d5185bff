"""What the embedding pipeline reads: a folder, a manifest (JSONL or CSV) or webdataset shards, as `Item`s.

An `Item` names its bytes (a file, or a byte range inside a tar shard) instead of holding them, so a list of
millions stays small, pickles cheaply to decode workers, and each worker reads its own bytes in parallel.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .files import IMAGE_EXTENSIONS, normalise

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv")


class SourceError(ValueError):
    """An input (folder, manifest, shard) that cannot be read as a list of images."""


@dataclass(frozen=True)
class Item:
    """One image to embed. `key` is what the output calls it (clip-retrieval's `image_path`)."""

    key: str
    path: str  # file holding the bytes (the image itself, or the tar shard)
    offset: int = 0  # byte range inside `path`; length -1: the whole file
    length: int = -1
    caption: str | None = None
    metadata: dict = field(default_factory=dict)

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.length < 0:
                return f.read()
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.path} ends inside member {self.key} (shard truncated)")
        return data


def list_items(inputs: str | Path | Iterable[str | Path]) -> list[Item]:
    """Items of every input, in order: folders (recursive, sorted), manifests, .tar shards, single files."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items: list[Item] = []
    for inp in inputs:
        p = Path(normalise(inp))
        if p.is_dir():
            items += folder_items(p)
        elif p.suffix == ".tar" and p.is_file():
            items += shard_items(p)
        elif p.suffix.lower() in MANIFEST_SUFFIXES and p.is_file():
            items += manifest_items(p)
        elif p.is_file():
            items.append(Item(str(p), str(p)))
        else:
            raise SourceError(f"input {inp} does not exist")
    return items


def folder_items(root: Path) -> list[Item]:
    """Image files under `root`; a `name.txt` beside `name.jpg` is its caption (img2dataset's layout)."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        present = set(names)
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            f = os.path.join(dirpath, name)
            caption = None
            if stem + ".txt" in present:
                caption = Path(dirpath, stem + ".txt").read_text(encoding="utf-8", errors="replace").strip()
            out.append(Item(f, f, caption=caption))
    return out


def _manifest_row(row: dict, base: Path, where: str) -> Item:
    image = row.get("image", row.get("image_path", row.get("path")))
    if not isinstance(image, str) or not image:
        raise SourceError(f"{where}: no 'image' (or 'image_path', 'path') field")
    path = normalise(base / image)  # an absolute `image` replaces `base`
    caption = row.get("caption")
    if caption is None and isinstance(row.get("captions"), list) and row["captions"]:
        caption = row["captions"][0]  # several captions per image: the first one is the image's caption
    skip = {"image", "image_path", "path", "caption", "captions"}
    meta = {k: v for k, v in row.items() if k not in skip}
    return Item(path, path, caption=None if caption is None else str(caption), metadata=meta)


def manifest_items(path: Path) -> list[Item]:
    """JSONL (one object per line; keys other than image/caption(s) become metadata columns) or CSV/TSV (read
    by clipforge.data.manifest, as training reads it); relative paths are relative to the manifest's folder."""
    if path.suffix.lower() in (".csv", ".tsv"):
        from clipforge.data.manifest import read_manifest

        try:
            samples = read_manifest(path)
        except (UnicodeDecodeError, csv.Error) as e:
            raise SourceError(f"{path}: not a readable manifest ({e})") from None
        items = []
        for s in samples:
            key = s.image if "://" in s.image else normalise(s.image)
            items.append(
                Item(key, key, caption=s.captions[0] if s.captions else None, metadata={"key": s.key})
            )
        return items
    base, out = path.parent, []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                out.append(_manifest_row(row, base, f"{path}:{n}"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return out


def shard_items(path: Path) -> list[Item]:
    """Samples of a webdataset tar: members grouped by key (the name up to the first dot of its base name).
    The image is read later from its byte range; `txt` is the caption, `json` the metadata."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                stem, _, ext = base.partition(".")
                groups.setdefault(os.path.join(d, stem), {})[ext.lower()] = m
            out = []
            for key, members in groups.items():
                img = next((members[e] for e in SHARD_IMAGE_EXTS if e in members), None)
                if img is None:
                    continue
                caption = _member_text(tar, members.get("txt"))
                meta_text = _member_text(tar, members.get("json"))
                meta = json.loads(meta_text) if meta_text else {}
                out.append(
                    Item(
                        f"{path.name}/{key}",
                        str(path),
                        img.offset_data,
                        img.size,
                        caption,
                        meta if isinstance(meta, dict) else {"json": meta},
                    )
                )
    except (tarfile.TarError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not a readable webdataset shard ({e})") from None
    return out


def _member_text(tar: tarfile.TarFile, m: tarfile.TarInfo | None) -> str | None:
    if m is None:
        return None
    f = tar.extractfile(m)
    return None if f is None else f.read().decode("utf-8", errors="replace").strip()
