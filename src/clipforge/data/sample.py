"""The Sample every stage reads, and the rules that turn a row or a group of files into one.

`clipforge.data.sources` is the reader (it documents the rules for each input); this module holds what the
readers share: the record types, the errors, the caption, path and metadata rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

IMAGE_FIELDS = ("image", "image_path", "filepath", "path", "file")  # clip-retrieval: image_path
CAPTION_FIELDS = ("captions", "caption", "text")
KEY_FIELD = "key"
MAX_SIDECAR_BYTES = 16 << 20  # a .txt/.json sidecar larger than this is not a caption file


class SourceError(ValueError):
    """An input that cannot be read: unknown kind, bad JSON, missing columns; the message names file and line."""


class SourceNotFoundError(SourceError, FileNotFoundError):
    """An input path that does not exist (also a FileNotFoundError, as callers have always caught)."""


class SampleError(SourceError):
    """One sample that cannot be used (a shard record without image, an unreadable sidecar)."""


@dataclass(frozen=True)
class Member:
    """Bytes inside a local file: a tar shard member, read when decoded, so a list of millions stays small
    and pickles cheaply to worker processes."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path} ends inside a member at byte {self.offset} (shard truncated)")
        return data


ImageRef = str | bytes | Member  # an absolute path or URL, encoded bytes, or a byte range


@dataclass(frozen=True)
class Sample:
    """One image and everything written about it. `key` is unique within its source."""

    key: str
    image: ImageRef
    captions: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    origin: str = field(default="", compare=False, repr=False)  # "file:line" (or the file) for messages

    def read(self) -> bytes:
        """The encoded image bytes."""
        if isinstance(self.image, bytes):
            return self.image
        if isinstance(self.image, Member):
            return self.image.read()
        with open(self.image, "rb") as f:
            return f.read()

    def load(self, **options: Any) -> Image.Image:
        """Decode with THE decoder, `clipforge.transforms.load_image` (EXIF orientation, alpha on white,
        the pixel limit), which takes `options` (`draft_size` for the fast JPEG path, `max_pixels`)."""
        from clipforge.transforms import load_image

        src = self.image if isinstance(self.image, (str, bytes)) else self.image.read()
        return load_image(src, name=self.key, **options)


# ------------------------------------------------------------------------------------------------ rules


def clean_captions(raw: object, where: str) -> tuple[str, ...]:
    """A caption value (None, a string or a list of strings) -> its stripped, non-empty captions."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(c, str) for c in raw):
        raise SourceError(f"{where}: captions must be a string or a list of strings, got {raw!r:.80}")
    return tuple(c.strip() for c in raw if c.strip())


def captions_from(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The caption rule: the first of CAPTION_FIELDS whose value is not null."""
    name = next((f for f in CAPTION_FIELDS if row.get(f) is not None), None)
    return () if name is None else clean_captions(row[name], where)


def resolve_image(image: str, base: str) -> str:
    """The path rule: relative to `base` (the manifest's folder), absolute and normalised, symlinks kept."""
    if "://" in image:
        return image
    return os.path.abspath(os.path.join(base, image))


def metadata_of(row: Mapping[str, Any], skip: Iterable[str]) -> dict[str, Any]:
    """The metadata rule: every field but the key, the caption fields and those in `skip` (the image's)."""
    drop = {KEY_FIELD, *CAPTION_FIELDS, *skip}
    return {k: v for k, v in row.items() if k not in drop}


def group_sample(key: str, image: ImageRef, txt: str | None, meta_json: str | None, where: str) -> Sample:
    """A sample from an image and its sidecars (files beside it, or members of a shard record)."""
    meta: Any = {}
    if meta_json is not None:
        try:
            meta = json.loads(meta_json)
        except ValueError:
            raise SampleError(f"{where}: its .json sidecar is not valid JSON") from None
        if not isinstance(meta, dict):
            raise SampleError(f"{where}: its .json sidecar holds a {type(meta).__name__}, not an object")
    caps = clean_captions(txt.splitlines(), where) if txt is not None else captions_from(meta, where)
    return Sample(key, image, caps, metadata_of(meta, ()), where)
