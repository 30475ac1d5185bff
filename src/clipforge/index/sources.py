"""What the embedding pipeline reads, as `Item`s: an adapter over `clipforge.data.sources`, the one reader
of every stage (its docstring and docs/data.md give the rules), so an image is indexed under the captions
and metadata that training and evaluation see for it.

An `Item` names its bytes (a file, or a byte range inside a tar shard) instead of holding them, so a list of
millions stays small, pickles cheaply to decode workers, and each worker reads its own bytes in parallel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from clipforge.data.sample import Member, Sample, SourceError
from clipforge.data.sources import iter_samples

__all__ = ["Item", "SourceError", "item_of", "list_items"]

log = logging.getLogger("clipforge.index")


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


def item_of(sample: Sample) -> Item:
    """A sample as the index keys it: a file by its absolute path (as the collection stores files), a shard
    member by `SHARD.tar/KEY`; its first caption, its metadata."""
    caption = sample.captions[0] if sample.captions else None
    meta = dict(sample.metadata)
    if isinstance(sample.image, Member):
        m = sample.image
        return Item(sample.key, m.path, m.offset, m.size, caption, meta)
    if isinstance(sample.image, str) and "://" not in sample.image:
        return Item(sample.image, sample.image, caption=caption, metadata=meta)
    raise SourceError(f"{sample.origin or sample.key}: only local files and local shards can be embedded")


def _skip(e: Exception) -> None:
    log.warning("skipping a shard record: %s", e)  # a bad record must not stop a bulk run over millions


def list_items(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Item]:
    """Items of every input, in order: folders (recursive, sorted), manifests, .tar shards, single images."""
    if not isinstance(inputs, (str, os.PathLike)):
        inputs = list(inputs)
    return [item_of(s) for s in iter_samples(inputs, on_error=_skip)]
