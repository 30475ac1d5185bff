"""Finding, hashing and decoding the image files that `Collection.add` is given."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass
class FileEntry:
    path: str  # absolute, the row's key
    data: bytes
    sha256: str
    size: int
    mtime: float


def walk(items: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """Yield (absolute path, None) for files to try and (path, reason) for paths to report, in sorted order.

    Reasons: "missing" (does not exist) and "not an image" (a non-image file met inside a folder).
    A file named explicitly is always tried, whatever its extension.
    """
    if isinstance(items, (str, Path)):
        items = [items]
    for item in items:
        p = Path(item).expanduser().absolute()
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    f = Path(root) / name
                    ok = f.suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")
                    yield str(f), None if ok else "not an image"
        elif p.is_file():
            yield str(p), None
        else:
            yield str(p), "missing"


def read(path: str) -> FileEntry:
    with open(path, "rb") as f:
        data = f.read()
        st = os.fstat(f.fileno())
    return FileEntry(path, data, hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime)


def decode(entry: FileEntry):
    """Fully decode to an RGB PIL image, so a truncated or bogus file fails here and not inside a batch."""
    from PIL import Image

    with Image.open(io.BytesIO(entry.data)) as im:
        im.load()
        return im.convert("RGB")


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
