"""THE reader of image-caption data. Training, evaluation, embedding and indexing all list their input here,
so one manifest line is the same sample in every stage.

    any input -> Sample(key, image, captions, metadata)        (embedding folders -> EmbeddingPart)

Inputs, told apart by `source_kind`:

- JSON lines (`.jsonl`): one object per line. CSV / TSV (`.csv`, `.tsv`): a header row, one row per line.
- A folder of images (recursive, sorted), each with optional same-stem sidecars: `cat.txt` (captions) and
  `cat.json` (metadata), img2dataset's layout.
- WebDataset tar shards: a `.tar` path, a folder holding `.tar` files, a brace pattern or a URL. A sample is
  the members sharing a key (webdataset's rule: the name up to the first dot of its base name).
- A single image file (one sample, no caption).
- Embedding folders (clip-retrieval's `img_emb/` + `metadata/`, or `clipforge embed` output): vectors, not
  images, so they are read by `read_embeddings` as `EmbeddingPart`s, never as Samples.

The rules (docs/data.md says the same for users):

- Image: the first of `IMAGE_FIELDS` a row has. A relative path is joined to the manifest's folder, then
  made absolute and normalised (`os.path.abspath`, not `resolve()`: a symlinked photo library keeps the
  names it was given). A URL (`://`) is kept as written.
- Captions: the first of `CAPTION_FIELDS` ("captions", "caption", "text") whose value is not null, a string
  or a list of strings ("captions" first: the corpus builder writes it and training always preferred it;
  "caption" is img2dataset's and clip-retrieval's column); in CSV/TSV every column whose name starts with "caption" (else a "text" column),
  a cell holding several separated by "|". Folders and shards: the `.txt` sidecar, one caption per
  non-empty line, else the `.json` sidecar by the field rule. Captions are stripped; empty ones dropped.
- Key: a "key" field, else the image as written (folders: the path relative to the folder; shards:
  `SHARD.tar/KEY`). Rows sharing a key are one sample: captions concatenated in file order, the first
  row's metadata (later rows only add keys it lacks); two images under one key are an error.
- Metadata: every other field of the row (or the `.json` sidecar), minus the image, key and caption fields.

The record types, errors and field rules live in `clipforge.data.sample` (shared with `tars.py`, which
reads shards). Errors: `SourceError` (a ValueError) names the file and line. `SampleError` (a SourceError) is one shard
record or sidecar that cannot be used; streaming readers report it to `on_error` and go on.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipforge.data.sample import (
    CAPTION_FIELDS,
    IMAGE_FIELDS,
    KEY_FIELD,
    MAX_SIDECAR_BYTES,
    ImageRef,
    Member,
    Sample,
    SampleError,
    SourceError,
    SourceNotFoundError,
    captions_from,
    clean_captions,
    group_sample,
    metadata_of,
    resolve_image,
)
from clipforge.data.tars import is_remote, is_shard_source, shard_samples, shard_urls
from clipforge.media.formats import EXTRA_IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CAPTION_FIELDS",
    "IMAGE_FIELDS",
    "EmbeddingPart",
    "ImageRef",
    "Member",
    "Sample",
    "SampleError",
    "SourceError",
    "SourceNotFoundError",
    "is_shard_source",
    "iter_samples",
    "open_source",
    "read_embeddings",
    "read_folder",
    "read_manifest",
    "role_items",
    "source_kind",
]

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".tsv")
# Pillow's formats, then HEIC/HEIF, AVIF and camera RAW (read through `clipforge.media` with the [media] extra;
# without it such a file is reported as unreadable rather than silently left out of a folder).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff") + tuple(
    sorted(EXTRA_IMAGE_EXTENSIONS)
)
CAPTION_SEPARATOR = "|"  # between several captions in one CSV/TSV cell


@dataclass(frozen=True)
class EmbeddingPart:
    """One part of an embedding folder. A vector row is not a Sample: its image may not be readable here (a
    shard member, another machine's path) and consumers want whole memory-mapped blocks, not rows."""

    vectors: np.ndarray  # (n, D) image embeddings, memory-mapped
    keys: list[str]  # image_path of each row
    captions: list[tuple[str, ...]]
    metadata: list[dict[str, Any]]  # the other columns (sha256, the input's fields); nulls dropped
    text_vectors: np.ndarray | None = None  # (n, D) caption embeddings, when the folder has them


# ---------------------------------------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Samples of a `.jsonl`, `.csv` or `.tsv` manifest, or of a folder of images; rows sharing a key merged."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(p):
        return read_folder(p)
    if not os.path.exists(p):
        raise SourceNotFoundError(f"manifest not found: {p}")
    suffix = os.path.splitext(p)[1].lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(p)
    elif suffix in (".csv", ".tsv"):
        rows = _read_table(p, "\t" if suffix == ".tsv" else ",")
    else:
        raise SourceError(f"{p}: unknown manifest type {suffix!r}; valid: {', '.join(MANIFEST_SUFFIXES)}")
    if not rows:
        raise SourceError(f"{p}: no samples")
    return merge(rows)


def _row_sample(row: Mapping[str, Any], base: str, where: str) -> Sample:
    image_field = next((f for f in IMAGE_FIELDS if f in row), None)
    image = row.get(image_field) if image_field else None
    if not isinstance(image, str) or not image.strip():
        raise SourceError(f"{where}: needs an image path (a non-empty string) in one of {IMAGE_FIELDS}")
    key = row.get(KEY_FIELD)
    return Sample(
        image if key is None else str(key),
        resolve_image(image.strip(), base),
        captions_from(row, where),
        metadata_of(row, [image_field]),
        where,
    )


def _not_utf8(where: str, e: UnicodeDecodeError) -> SourceError:
    return SourceError(f"{where}: not UTF-8 text ({e.reason}); save the manifest as UTF-8")


def _read_jsonl(path: str) -> list[Sample]:
    base, out = os.path.dirname(path), []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a decoding error names its line
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # spreadsheets save a byte-order mark
            except UnicodeDecodeError as e:
                raise _not_utf8(where, e) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{where}: expected a JSON object, got {type(row).__name__}")
            out.append(_row_sample(row, base, where))
    return out


def _read_table(path: str, delimiter: str) -> list[Sample]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            return _table_samples(path, reader)
        except UnicodeDecodeError as e:
            raise _not_utf8(f"{path}: near line {reader.line_num + 1}", e) from None
        except csv.Error as e:
            raise SourceError(f"{path}:{reader.line_num}: {e}") from None


def _table_samples(path: str, reader: Any) -> list[Sample]:
    """Samples of a CSV/TSV table from its `csv.reader` (header row first)."""
    base = os.path.dirname(path)
    header = [h.strip() for h in next(reader, [])]
    names = [h.lower() for h in header]
    image_col = next((names.index(c) for c in IMAGE_FIELDS if c in names), None)
    if image_col is None:
        raise SourceError(f"{path}: header {header} needs an image column (one of {IMAGE_FIELDS})")
    caption_cols = [i for i, h in enumerate(names) if h.startswith("caption")]
    caption_cols = caption_cols or [i for i, h in enumerate(names) if h == "text"]
    key_col = names.index(KEY_FIELD) if KEY_FIELD in names else None
    special = {image_col, key_col, *caption_cols}
    out = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"{path}:{reader.line_num}"
        if len(row) != len(header):
            raise SourceError(f"{where}: {len(row)} fields, the header has {len(header)}")
        image = row[image_col].strip()
        if not image:
            raise SourceError(f"{where}: empty image path")
        caps = [c for i in caption_cols for c in row[i].split(CAPTION_SEPARATOR)]
        meta = {header[i]: v for i, v in enumerate(row) if i not in special and v.strip()}
        key = row[key_col].strip() if key_col is not None and row[key_col].strip() else image
        out.append(Sample(key, resolve_image(image, base), clean_captions(caps, where), meta, where))
    return out


def merge(samples: Iterable[Sample]) -> list[Sample]:
    """Rows sharing a key (one row per caption, as COCO-style files have) -> one sample at the first row's
    position: captions concatenated in file order, the first row's metadata plus keys only later rows have."""
    merged: dict[str, Sample] = {}
    for s in samples:
        prev = merged.get(s.key)
        if prev is None:
            merged[s.key] = s
        elif prev.image != s.image:
            raise SourceError(
                f"{s.origin}: key {s.key!r} names {s.image}, but {prev.origin} named {prev.image}"
            )
        else:
            meta = {**s.metadata, **prev.metadata}
            merged[s.key] = Sample(s.key, s.image, prev.captions + s.captions, meta, prev.origin)
    return list(merged.values())


# ------------------------------------------------------------------------------------ folders and groups


def _sidecar(path: str) -> str:
    size = os.path.getsize(path)
    if size > MAX_SIDECAR_BYTES:
        raise SourceError(f"{path}: {size} bytes is too large for a caption or metadata sidecar")
    return Path(path).read_text(encoding="utf-8", errors="replace")


def read_folder(folder: str | os.PathLike) -> list[Sample]:
    """Images under `folder` (recursive, sorted by path; hidden files and folders skipped), each with the
    captions and metadata of its same-stem `.txt` and `.json` sidecars."""
    root = os.path.abspath(os.path.expanduser(os.fspath(folder)))
    found = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        present = set(names)
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                found.append((rel.split("/"), dirpath, name, stem, present))
    if not found:
        raise SourceError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    out = []
    for parts, dirpath, name, stem, present in sorted(found, key=lambda t: t[0]):
        path = os.path.join(dirpath, name)
        side = {e: os.path.join(dirpath, stem + e) for e in (".txt", ".json") if stem + e in present}
        text = {e: _sidecar(p) for e, p in side.items()}
        out.append(group_sample("/".join(parts), path, text.get(".txt"), text.get(".json"), path))
    return out


# --------------------------------------------------------------------------------------- embedding folders


def is_embedding_folder(path: str | os.PathLike) -> bool:
    """clip-retrieval's layout (img_emb/ + metadata/) or `clipforge embed` output (img_emb/ + embeddings.json)."""
    p = Path(path)
    return (p / "img_emb").is_dir() and ((p / "metadata").is_dir() or (p / "embeddings.json").is_file())


def _part_names(root: Path) -> tuple[list[str], int | None]:
    """(part suffixes in order, the vectors' dimension if known): from the clipforge sidecar (every part
    must carry its done-marker), else the img_emb_<i>.npy files present (clip-retrieval writes no sidecar)."""
    side = root / "embeddings.json"
    if side.is_file():
        try:
            header = json.loads(side.read_text(encoding="utf-8"))
            n, dim = int(header["parts"]), int(header["dim"])
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{side}: unreadable sidecar ({e})") from None
        names = [str(i).zfill(len(str(max(n, 1)))) for i in range(n)]
        missing = [x for x in names if not (root / "_done" / f"part_{x}.json").is_file()]
        if missing:
            raise SourceError(f"{root} is unfinished: parts {missing[:10]} missing; rerun the embedding")
        return names, dim
    found = [p.stem.removeprefix("img_emb_") for p in (root / "img_emb").glob("img_emb_*.npy")]
    names = sorted((x for x in found if x.isdigit()), key=int)
    if not names:
        raise SourceError(f"{root}: no img_emb/img_emb_<i>.npy parts")
    return names, None


def read_embeddings(folder: str | os.PathLike) -> Iterator[EmbeddingPart]:
    """The parts of an embedding folder in order; vectors stay memory-mapped on disk."""
    import numpy as np

    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading embedding folders needs pyarrow: pip install 'clipforge[index]'") from e
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    if not is_embedding_folder(root):
        raise SourceError(f"{root}: not an embedding folder (img_emb/ with metadata/ or embeddings.json)")
    names, dim = _part_names(root)
    for name in names:
        where = f"{root}: part {name}"
        meta_file = root / "metadata" / f"metadata_{name}.parquet"
        if not meta_file.is_file():
            raise SourceError(f"{where}: {meta_file.name} is missing")
        vecs = np.load(root / "img_emb" / f"img_emb_{name}.npy", mmap_mode="r")
        text_file = root / "text_emb" / f"text_emb_{name}.npy"
        text = np.load(text_file, mmap_mode="r") if text_file.is_file() else None
        rows = pq.read_table(meta_file).to_pylist()
        if vecs.ndim == 2 and len(vecs) and dim is None:
            dim = vecs.shape[1]
        if vecs.ndim != 2 or len(rows) != len(vecs) or (len(vecs) and vecs.shape[1] != dim):
            raise SourceError(
                f"{where}: vectors of shape {vecs.shape} for {len(rows)} metadata rows (dim {dim})"
            )
        if text is not None and text.shape != vecs.shape:
            raise SourceError(
                f"{where}: caption vectors {text.shape} do not match image vectors {vecs.shape}"
            )
        keys, caps, meta = [], [], []
        for i, row in enumerate(rows):
            image_field = next((f for f in IMAGE_FIELDS if row.get(f) is not None), None)
            if image_field is None:
                raise SourceError(f"{meta_file}: row {i} names no image (one of {IMAGE_FIELDS})")
            keys.append(str(row[image_field]))
            caps.append(captions_from(row, f"{meta_file}: row {i}"))
            meta.append({k: v for k, v in metadata_of(row, [image_field]).items() if v is not None})
        yield EmbeddingPart(vecs, keys, caps, meta, text)


# ---------------------------------------------------------------------------------------------- dispatch


def source_kind(source: str | os.PathLike) -> str:
    """ "manifest", "folder", "shards", "image" or "embeddings"; SourceError for what is none of them."""
    s = os.fspath(source)
    if is_remote(s) or "{" in s:
        return "shards"
    p = os.path.abspath(os.path.expanduser(s))
    if os.path.isdir(p):
        if is_embedding_folder(p):
            return "embeddings"
        names = os.listdir(p)
        if any(n.endswith(".tar") for n in names):
            images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
            if images:
                raise SourceError(f"{p} holds both .tar shards and images ({images[0]}); give one kind")
            return "shards"
        return "folder"
    if not os.path.exists(p):
        raise SourceNotFoundError(f"data source not found: {s}")
    suffix = os.path.splitext(p)[1].lower()
    if suffix == ".tar":
        return "shards"
    if suffix in MANIFEST_SUFFIXES:
        return "manifest"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise SourceError(
        f"{s}: not a data source; give a manifest ({', '.join(MANIFEST_SUFFIXES)}), a folder of images, "
        "an image file, a folder of .tar shards, a .tar path, a brace pattern, a URL or an embedding folder"
    )


def _as_list(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    return [source] if isinstance(source, (str, os.PathLike)) else list(source)


def open_source(
    source: str | os.PathLike | Sequence[str | os.PathLike], *, embeddings: bool = False
) -> tuple[str, list]:
    """("manifest", Samples) for manifests, image folders and image files; ("shards", shard urls);
    ("embeddings", folders) only when `embeddings` (stages that need images refuse vectors). A list of
    sources of one kind is concatenated. (The loader plans an epoch from this.)"""
    kinds, items = set(), []
    for src in _as_list(source):
        kind = source_kind(src)
        if kind == "embeddings" and not embeddings:
            raise SourceError(f"{src} is an embedding folder (vectors, no images); this stage needs images")
        if kind == "shards":
            got: list = shard_urls(src)
        elif kind == "embeddings":
            got = [os.path.abspath(os.fspath(src))]
        elif kind == "image":
            p = os.path.abspath(os.path.expanduser(os.fspath(src)))
            got, kind = [Sample(p, p, (), {}, p)], "manifest"
        else:
            got, kind = read_manifest(src), "manifest"
        kinds.add(kind)
        items += got
    if len(kinds) > 1:
        raise SourceError(f"cannot mix {' and '.join(sorted(kinds))} in one source list: {_as_list(source)}")
    if not kinds:
        raise SourceError("no data source given")
    return kinds.pop(), items


def role_items(n: int, rank: int, world_size: int, workers: int) -> list[list[int]]:
    """Which of `n` items (samples or shards) each worker role of `rank` reads: rank-strided, then
    worker-strided; min(workers, items of this rank) roles. Every item goes to exactly one (rank, role)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    mine = list(range(rank, n, world_size))
    k = min(max(1, workers), len(mine))
    return [mine[v::k] for v in range(k)]


def iter_samples(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rank: int = 0,
    world_size: int = 1,
    worker: int = 0,
    workers: int = 1,
    on_error: Callable[[Exception], None] | None = None,
) -> Iterator[Sample]:
    """Every sample of `source` (one input or a list, kinds may mix) in order, or the share of (rank,
    worker) by `role_items`: shards are dealt out whole, manifest samples one by one. Shards are read
    lazily; a bad shard record raises, or goes to `on_error` and the rest go on."""
    for src in _as_list(source):
        kind, items = open_source(src)
        roles = role_items(len(items), rank, world_size, workers)
        for i in roles[worker] if worker < len(roles) else []:
            if kind == "shards":
                yield from shard_samples(items[i], on_error)
            else:
                yield items[i]
