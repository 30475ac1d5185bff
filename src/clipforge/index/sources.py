"""What the embedding pipeline reads, as `Item`s: an adapter over `clipforge.data.sources`, the one reader
of every stage (its docstring and docs/data.md give the rules), so an image is indexed under the captions
and metadata that training and evaluation see for it. Videos, which that reader leaves out (they carry no
captions to train on), are added here: a video file, or each video in a folder, is one item per sampled
moment, under the key and metadata a collection gives it (`VIDEO#t=SECONDS`, media/video.py).

An `Item` names its bytes (a file, or a byte range inside a tar shard) instead of holding them, so a list of
millions stays small, pickles cheaply to decode workers, and each worker reads its own bytes in parallel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from clipforge.data.sample import Member, Sample, SourceError
from clipforge.data.sources import iter_samples, source_kind
from clipforge.media.video import Sampling, video_items

from . import files

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
    t: float | None = None  # a moment of the video at `path`: its frame at t seconds, not the file's bytes
    failed: str | None = None  # why it cannot be read, found while listing (a video that does not open)

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


def list_items(
    inputs: str | os.PathLike | Iterable[str | os.PathLike], sampling: Sampling = Sampling()
) -> list[Item]:
    """Items of every input, in order: folders (recursive, sorted; their images, then their videos'
    moments), manifests, .tar shards, single images, single videos (their moments, sampled by `sampling`)."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out: list[Item] = []
    for src in inputs:
        media = _local_media(src)
        videos = [p for p in media or () if files.is_video(p)]
        if not videos or len(videos) < len(media):  # images to read (or none at all: the reader says so)
            out += [item_of(s) for s in iter_samples(src, on_error=_skip)]
        for video in videos:
            out += moment_items(video, sampling)
    return out


def _local_media(src: str | os.PathLike) -> list[str] | None:
    """The image and video files an input names: itself, a video file; those under it, a folder (walked as
    `Collection.add` walks it); None for any other input."""
    s = os.fspath(src)
    if os.path.isfile(s) and files.is_video(s):
        return [files.normalise(s)]
    try:
        if source_kind(s) != "folder":
            return None
    except SourceError:
        return None
    return [p for p, reason in files.walk(s) if reason is None]


def moment_items(video: str, sampling: Sampling) -> list[Item]:
    """One item per sampled moment of `video`; a video that cannot be opened is one failed item, so it is
    reported by name with the others' skips."""
    try:
        moments = video_items(video, sampling.interval, sampling.max_frames)
    except Exception as e:  # noqa: BLE001 - ImageError, or whatever FFmpeg raises: reported per video
        return [Item(video, video, failed=files.failure_reason(e, video))]
    return [Item(m.key, video, metadata=m.metadata, t=m.t) for m in moments]
