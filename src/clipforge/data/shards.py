"""WebDataset tar shards in the img2dataset layout: write them from a manifest, list, count and read them.

Each sample is a group of tar members sharing a key: `KEY.jpg` / `KEY.png` / `KEY.webp` (the image),
`KEY.txt` (captions, one per line) and `KEY.json` (metadata). When `.txt` is missing, captions come from
the JSON by the caption rule of `clipforge.data.sample`. `shard_samples` reads a shard for every stage in
one of two ways that give the same Samples: a local tar is indexed with tarfile (images stay byte ranges,
no webdataset needed); a remote one is streamed through webdataset, each record made a Sample by
`record_sample`. `write_shards` also leaves `shards.json` beside the shards: the sample count of each shard
(so a loader knows an epoch's length without reading them) and where they came from.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.sample import (
    MAX_SIDECAR_BYTES,
    Member,
    Sample,
    SampleError,
    SourceError,
    SourceNotFoundError,
    group_sample,
)
from clipforge.transforms import ImageError, load_image

SIDECAR = "shards.json"
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
_WDS_KEY = re.compile(
    r"^((?:.*/|)[^.]+)[.]([^/]*)$"
)  # webdataset's rule: key ends at the basename's first dot
_WDS_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (__meta__ and the like)
log = logging.getLogger("clipforge.data")


class ShardError(SourceError):
    """Shards that cannot be written."""


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError as e:
        raise ImportError(
            "writing shards, or reading remote or patterned ones, needs webdataset: pip install 'clipforge[train]'"
        ) from e
    return webdataset


# ------------------------------------------------------------------------------------------------ writing


def _image_record(path: str) -> tuple[str, bytes]:
    """(extension, bytes) of an image file: JPEG/PNG/WebP bytes as they are, other formats re-encoded as
    PNG. Raises ImageError (missing, unreadable) so the caller can skip the sample."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot open ({e.strerror or e})") from e
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception as e:
        raise ImageError(f"{path}: not a recognised image file") from e
    if fmt in _KEEP_FORMATS:
        return _KEEP_FORMATS[fmt], data
    buf = io.BytesIO()
    load_image(data, name=path).save(buf, format="PNG")
    return "png", buf.getvalue()


def write_shards(
    source: str | Path, out_dir: str | Path, shard_size: int = 1000, progress: bool = False
) -> dict[str, Any]:
    """Write the samples of a manifest (or image+txt folder) as `out_dir/00000.tar, 00001.tar, ...` with
    `shard_size` samples each, plus the `shards.json` sidecar, which this returns. Samples whose image is
    missing or unreadable or that have no caption are skipped, counted and named in the sidecar."""
    from clipforge.data.sources import read_manifest  # sources imports this module: import when used

    wds = _webdataset()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    samples = read_manifest(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise ShardError(f"{out} already holds .tar files; write shards into an empty folder")
    skipped: list[str] = []
    n = 0
    # maxsize is effectively unbounded so every shard holds exactly shard_size samples (the last fewer).
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=shard_size, maxsize=1e15, verbose=0) as sink:
        for s in _progress(samples, progress):
            record = _record(s, n, skipped)
            if record is not None:
                sink.write(record)
                n += 1
    if n == 0:
        (out / "00000.tar").unlink(missing_ok=True)
        raise ShardError(f"{source}: no usable samples (e.g. {skipped[:3]})")
    counts = [min(shard_size, n - i) for i in range(0, n, shard_size)]
    info = {
        "format": "img2dataset",
        "count": n,
        "shards": [f"{i:05d}.tar" for i in range(len(counts))],
        "counts": counts,
        "source": str(source),
        "skipped": len(skipped),
        "skipped_examples": skipped[:10],
    }
    (out / SIDECAR).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    return info


def _record(s: Sample, index: int, skipped: list[str]) -> dict[str, Any] | None:
    if not s.captions:
        skipped.append(f"{s.key}: no caption")
        return None
    try:
        ext, data = _image_record(s.image)
    except ImageError as e:
        skipped.append(str(e))
        return None
    captions = [" ".join(c.split()) for c in s.captions]  # one caption per line: no newlines inside
    meta = {"key": f"{index:09d}", "source_key": s.key, "caption": captions[0], "captions": captions}
    return {
        "__key__": f"{index:09d}",
        ext: data,
        "txt": "\n".join(captions).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def _progress(items: list, on: bool) -> Any:
    if not on:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="shard", unit="img")


# ------------------------------------------------------------------------------------- listing, counting


def count_tar(path: str) -> int:
    """Samples (distinct keys) in a local tar, reading member headers only (tarfile seeks past the data)."""
    keys = set()
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                match = _WDS_KEY.match(m.name)
                if m.isreg() and match and not _WDS_META.match(m.name):
                    keys.add(match.group(1))
    except tarfile.TarError as e:
        # A corrupt shard is counted as far as it reads; its bad tail is skipped and counted when loading.
        log.warning("%s: cannot read the whole tar (%s); counted %d samples", path, e, len(keys))
    return len(keys)


def shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard: from the `shards.json` sidecar beside them when it lists them all, else by
    reading local tar headers; None for remote shards without a sidecar."""
    if any(is_remote(u) for u in urls):
        return None
    by_dir: dict[str, dict[str, int]] = {}
    out = []
    for u in urls:
        folder, name = os.path.split(os.path.abspath(u))
        if folder not in by_dir:
            by_dir[folder] = _sidecar_counts(Path(folder))
        out.append(by_dir[folder][name] if name in by_dir[folder] else count_tar(u))
    return out


def _sidecar_counts(folder: Path) -> dict[str, int]:
    f = folder / SIDECAR
    if not f.is_file():
        return {}
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
        return dict(zip(info["shards"], (int(c) for c in info["counts"])))
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable sidecar, counting shards instead", f)
        return {}


# ------------------------------------------------------------------------------------------------ reading


def is_remote(url: str) -> bool:
    """A URL or a `pipe:` command, streamed rather than opened as a local file."""
    return "://" in url or url.startswith("pipe:")


def is_shard_source(source: str) -> bool:
    """A URL, a `pipe:` command, a brace pattern or a `.tar` path (rather than a manifest or folder)."""
    return is_remote(source) or "{" in source or source.endswith(".tar")


def shard_urls(source: str | os.PathLike) -> list[str]:
    """Shards of a folder of `.tar` files (sorted), a brace pattern (`a/{000..009}.tar`), a URL or a `.tar`
    path; local ones absolute."""
    s = os.fspath(source)
    if os.path.isdir(s):
        urls = sorted(os.path.join(os.path.abspath(s), n) for n in os.listdir(s) if n.endswith(".tar"))
        if not urls:
            raise SourceError(f"{s}: no .tar shards in this folder")
        return urls
    urls = [s] if not (is_remote(s) or "{" in s) else _webdataset().shardlists.expand_urls(s)
    urls = [u if is_remote(u) else os.path.abspath(os.path.expanduser(u)) for u in urls]
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise SourceNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def iter_records(urls: Sequence[str], on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw webdataset records ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}) of the shards in
    order, streamed (remote shards too). A corrupt member or shard goes to `on_error` (True: go on)."""
    return _webdataset().tarfile_to_samples(handler=on_error)(iter([{"url": u} for u in urls]))


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "replace")


def record_sample(rec: Mapping[str, Any]) -> Sample:
    """The Sample of a streamed shard record; image as bytes. SampleError when it has no image member."""
    url = str(rec.get("__url__", "?"))
    key = f"{os.path.basename(url)}/{rec.get('__key__', '?')}"
    image = next((rec[e] for e in SHARD_IMAGE_EXTS if e in rec), None)
    if image is None:
        raise SampleError(f"{key}: no image member (.{'/.'.join(SHARD_IMAGE_EXTS)})")
    return group_sample(key, image, _text(rec.get("txt")), _text(rec.get("json")), key)


def _tar_groups(
    path: str, report: Callable[[Exception], bool]
) -> Iterator[tuple[str, dict[str, bytes | Member]]]:
    """(key, {ext: Member for an image, bytes for anything else}) of a local tar: consecutive members
    grouped, meta members skipped, a repeated extension reported, as webdataset does."""
    with tarfile.open(path, "r:") as tar:  # uncompressed only: images are read back by byte range
        key, group = None, {}
        for m in tar:
            match = _WDS_KEY.match(m.name)
            if not m.isreg() or _WDS_META.match(m.name) or not match:
                continue
            prefix, ext = match.group(1), match.group(2).lower()
            if prefix != key and group:
                yield key, group
                group = {}
            key = prefix
            if ext in group:
                report(SampleError(f"{path}: member {m.name} repeats .{ext} in sample {prefix}; skipped"))
            elif ext in SHARD_IMAGE_EXTS:
                group[ext] = Member(path, m.offset_data, m.size)
            elif ext in ("txt", "json"):
                if m.size > MAX_SIDECAR_BYTES:
                    report(
                        SampleError(f"{path}: member {m.name} is {m.size} bytes, over {MAX_SIDECAR_BYTES}")
                    )
                    continue
                group[ext] = tar.extractfile(m).read()  # the next header read seeks back past it
        if group:
            yield key, group


def shard_samples(url: str, on_error: Callable[[Exception], None] | None = None) -> Iterator[Sample]:
    """Samples of one shard in order. A local tar is indexed without reading images (each is a `Member`
    byte range); a remote one is streamed (images as bytes). Bad records raise, or go to `on_error`."""

    def report(e: Exception) -> bool:
        if on_error is None:
            raise e
        on_error(e)
        return True

    if is_remote(url):
        records: Iterable[Mapping[str, Any]] = iter_records([url], report)
    else:
        records = ({"__url__": url, "__key__": k, **g} for k, g in _tar_groups(url, report))
    try:
        for rec in records:
            try:
                yield record_sample(rec)
            except SampleError as e:
                report(e)
    except (tarfile.TarError, OSError) as e:
        report(SourceError(f"{url}: not a readable uncompressed tar shard ({e})"))


def read_shards(source: str | os.PathLike) -> Iterator[tuple[str, bytes, tuple[str, ...]]]:
    """(key, image bytes, captions) of every sample, in shard order; a bad record or one without caption
    raises. For inspection and tests; training reads through `clipforge.data.loader`."""
    for url in shard_urls(source):
        for s in shard_samples(url):
            if not s.captions:
                raise SampleError(f"{s.key}: no caption")
            yield s.key, s.read(), s.captions
