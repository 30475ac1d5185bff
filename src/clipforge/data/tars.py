"""Reading WebDataset tar shards (img2dataset's layout) into Samples; writing and counting them is `shards.py`.

A sample is the members sharing a key (webdataset's rule: the name up to the first dot of its base name):
`KEY.jpg` / `KEY.jpeg` / `KEY.png` / `KEY.webp` (the image), `KEY.txt` (captions, one per line), `KEY.json`
(metadata; its captions by the caption rule of `clipforge.data.sample` when there is no `.txt`). Two ways
give the same Samples: a local tar is indexed with tarfile (images stay `Member` byte ranges, no webdataset
needed); a remote one (a URL, `pipe:`) is streamed through webdataset, each record made a Sample by
`record_sample`.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from clipforge.data.sample import (
    MAX_SIDECAR_BYTES,
    Member,
    Sample,
    SampleError,
    SourceError,
    SourceNotFoundError,
    group_sample,
)

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_WDS_KEY = re.compile(
    r"^((?:.*/|)[^.]+)[.]([^/]*)$"
)  # webdataset's rule: key ends at the basename's first dot
_WDS_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (__meta__ and the like)
log = logging.getLogger("clipforge.data")


def require_webdataset() -> Any:
    try:
        import webdataset
    except ImportError as e:
        raise ImportError(
            "writing shards, or reading remote or patterned ones, needs webdataset: pip install 'clipforge[train]'"
        ) from e
    return webdataset


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
    urls = [s] if not (is_remote(s) or "{" in s) else require_webdataset().shardlists.expand_urls(s)
    urls = [u if is_remote(u) else os.path.abspath(os.path.expanduser(u)) for u in urls]
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise SourceNotFoundError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def iter_records(urls: Sequence[str], on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Raw webdataset records ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}) of the shards in
    order, streamed (remote shards too). A corrupt member or shard goes to `on_error` (True: go on)."""
    return require_webdataset().tarfile_to_samples(handler=on_error)(iter([{"url": u} for u in urls]))


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
