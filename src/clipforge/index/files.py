"""Finding, hashing and decoding the image files that `Collection.add` is given, and the one spelling of a
file's path that the collection stores and looks up."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from clipforge.data.pretrained import sha256_file
from clipforge.data.sources import IMAGE_SUFFIXES
from clipforge.media.formats import VIDEO_EXTENSIONS
from clipforge.media.video import FRAME_MARK, parse_frame_key

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = frozenset(IMAGE_SUFFIXES)  # one list for every folder walk, data/sources.py's
# A video is stored as one row per sampled frame, keyed `VIDEO#t=SECONDS` (media/video.py).
INDEXED_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


@dataclass
class FileEntry:
    path: str  # absolute, the row's key
    data: bytes
    sha256: str
    size: int
    mtime: float


def normalise(path: str | os.PathLike) -> str:
    """The key a file is stored under: absolute, `~` expanded, `.` and `..` and doubled slashes folded
    (lexically: symlinks are kept, so a path-prefix filter sees the folders the user named)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def walk(items: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """Yield (absolute path, None) for files to try and (path, reason) for paths to report, in sorted order.

    Reasons: "missing" (does not exist) and "not an image" (a file that is neither an image nor a video, met
    inside a folder).
    A file named explicitly is always tried, whatever its extension.
    """
    if isinstance(items, (str, Path)):
        items = [items]
    for item in items:
        p = Path(normalise(item))
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    f = Path(root) / name
                    ok = f.suffix.lower() in INDEXED_EXTENSIONS and not name.startswith(".")
                    yield str(f), None if ok else "not an image"
        elif p.is_file():
            yield str(p), None
        else:
            yield str(p), "missing"


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def frame_prefix(video: str) -> str:
    """What the keys of a video's frame rows start with."""
    return video + FRAME_MARK


def backing_file(key: str) -> str:
    """The file a stored key was read from: a frame's video, else the key itself (a file whose own name
    looks like a frame key stays itself)."""
    frame = parse_frame_key(key)
    return frame[0] if frame and not os.path.isfile(key) else key


def hash_file(path: str) -> tuple[str, int, float]:
    """(sha256, size, mtime) of a file read in chunks: a video may not fit in memory."""
    st = os.stat(path)
    return sha256_file(Path(path)), st.st_size, st.st_mtime


def read(path: str) -> FileEntry:
    with open(path, "rb") as f:
        data = f.read()
        st = os.fstat(f.fileno())
    return FileEntry(path, data, hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime)


def decode(entry: FileEntry) -> Image.Image:
    """Fully decode to an RGB PIL image with the library's one decoder and its limits (pixels, aspect
    ratio), so a truncated, bogus or oversized file fails here with an ImageError and not inside a batch."""
    from clipforge.transforms import load_image

    return load_image(entry.data, name=entry.path)


def failure_reason(e: BaseException, key: str) -> str:
    """Why a file could not be added, without the file name (the report pairs the two)."""
    from clipforge.transforms import ImageError

    if isinstance(e, ImageError):
        return str(e).removeprefix(f"{key}: ")
    if isinstance(e, OSError):
        return f"cannot read: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"  # a codec error load_image does not know, or a MemoryError


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
