"""Videos into a collection: one row per sampled frame (media/video.py samples them), keyed `VIDEO#t=SECONDS`.

Every frame row carries the whole video's sha256, size and mtime, so a video is new, unchanged or changed as a
whole: a changed video's old frames are dropped in the transaction that stores its new ones, and a video is
one line of the add report (its path), not one per frame. Frames are decoded in this process, a few at a time,
so a long 4K video never holds more than `FRAME_BATCH` decoded frames.

A new or changed video is sampled as asked (media/video.py's defaults when nothing is asked). An unchanged
video keeps the moments it was sampled at, unless a sampling is asked for and its moments differ from the
stored ones: then the video is sampled again (an update), so `add --video-interval 1` after a first add at
the default 5 s gives the finer sampling, while a later plain `sync` keeps it (for the videos that did not
change: a changed one is sampled as that call asks, which is the default when it asks nothing).
"""

from __future__ import annotations

import itertools

import numpy as np

from clipforge.media.video import Sampling, has_frame_at, parse_frame_key, sampled_frames, video_items

from . import files
from .arrays import as_matrix
from .changes import commit_replacing, is_unchanged
from .store import Store
from .types import AddReport, EncoderLike

FRAME_BATCH = 16  # decoded frames held at once


def add_videos(
    store: Store, paths: list[str], encoder: EncoderLike, report: AddReport, sampling: Sampling | None = None
) -> None:
    """Add each video's sampled frames (`sampling`; None: the default, and stored videos keep theirs); a
    video that cannot be read or decoded goes to `report.failed` with the reason, and the others go on."""
    for path in paths:
        try:
            sha, size, mtime = files.hash_file(path)
        except OSError as e:
            report.failed.append((path, f"cannot read: {e.strerror or e}"))
            continue
        old = store.frame_rows(path)
        try:
            if is_unchanged(old, sha) and (sampling is None or _sampled_as(store, path, sampling)):
                report.unchanged.append(path)
                continue
            vectors, metas = _embed_frames(path, encoder, store.dim, sampling or Sampling())
        except Exception as e:  # noqa: BLE001 - ImageError, a codec's or the encoder's error: reported per video
            report.failed.append((path, files.failure_reason(e, path)))
            continue
        if not metas:
            report.failed.append((path, "no frame could be decoded"))
            continue
        file = {"sha256": sha, "size": size, "mtime": mtime}
        records = [{"path": key, **file, "metadata": meta} for key, meta in metas]
        frames = AddReport()  # per-frame bookkeeping; the caller's report names the video once
        commit_replacing(store, vectors, records, [[i for i, _ in old]] + [[]] * (len(records) - 1), frames)
        report.ids += frames.ids
        (report.updated if old else report.added).append(path)


def _sampled_as(store: Store, video: str, sampling: Sampling) -> bool:
    """Whether the video's stored frames are the moments `sampling` gives: all of them, or the first ones
    when the video shows no frame at the next (sampling stops there). Worked out from the container's
    duration; at most that one frame is decoded (all of them for a container that states no duration)."""
    stored = sorted(frame[1] for key in store.frame_keys(video) if (frame := parse_frame_key(key)))
    wanted = [item.t for item in video_items(video, sampling.interval, sampling.max_frames)]
    n = len(stored)
    if n == 0 or stored != wanted[:n]:
        return False
    return n == len(wanted) or not has_frame_at(video, wanted[n])


def _embed_frames(
    path: str, encoder: EncoderLike, dim: int, sampling: Sampling
) -> tuple[np.ndarray, list[tuple[str, dict]]]:
    """Vectors (F, D) of the video's sampled frames and (key, metadata) of each."""
    vecs, metas = [], []
    frames = sampled_frames(path, sampling.interval, sampling.max_frames)
    while batch := list(itertools.islice(frames, FRAME_BATCH)):
        vecs.append(as_matrix(encoder.embed_images([img for _, img in batch]), dim, "encoder output"))
        metas += [(item.key, item.metadata) for item, _ in batch]
    return (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), metas
