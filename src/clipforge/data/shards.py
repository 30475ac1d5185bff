"""WebDataset tar shards in the img2dataset layout: write them from a manifest, count them; reading them
into Samples is `tars.py` (which `clipforge.data.sources` reads through).

`write_shards` groups each sample's members under one key: `KEY.jpg` / `KEY.png` / `KEY.webp` (the image),
`KEY.txt` (captions, one per line) and `KEY.json` (metadata). It also leaves `shards.json` beside the
shards: the sample count of each shard (so a loader knows an epoch's length without reading them) and
where they came from.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.sample import Sample, SampleError, SourceError
from clipforge.data.sources import read_manifest
from clipforge.data.tars import count_tar, is_remote, require_webdataset, shard_samples, shard_urls
from clipforge.transforms import ImageError, load_image

SIDECAR = "shards.json"
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become PNG
log = logging.getLogger("clipforge.data")


class ShardError(SourceError):
    """Shards that cannot be written."""


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
    wds = require_webdataset()
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


def read_shards(source: str | os.PathLike) -> Iterator[tuple[str, bytes, tuple[str, ...]]]:
    """(key, image bytes, captions) of every sample, in shard order; a bad record or one without caption
    raises. For inspection and tests; training reads through `clipforge.data.loader`."""
    for url in shard_urls(source):
        for s in shard_samples(url):
            if not s.captions:
                raise SampleError(f"{s.key}: no caption")
            yield s.key, s.read(), s.captions
