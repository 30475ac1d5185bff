"""Video as stills: frames sampled at a fixed interval, each a searchable item that points at its moment.

A frame is found by seeking to the keyframe at or before its time and decoding forward to it, so sampling
costs at most one group of pictures per frame, not the whole video. Every frame passes the pixel and aspect
guards of `load_image` (the stream's declared size before decoding, each decoded frame's own size after), and
anything FFmpeg cannot read is an `ImageError` naming the file. Frames come out as a player shows them: the
stream's display matrix (a phone held upright records landscape pictures and a 90-degree turn) is applied.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image

from clipforge.transforms import MAX_ASPECT, MAX_PIXELS, ImageError, check_size

DEFAULT_INTERVAL = 5.0  # seconds between sampled frames
DEFAULT_MAX_FRAMES = 120  # per video: a 10-minute video at the default interval; longer ones are thinned
MAX_FRAMES_LIMIT = 10_000  # the most frames per video a caller may ask for (2.8 hours at one a second)
MIN_INTERVAL = 0.001  # a moment's key keeps milliseconds: frames closer than that would share a key
FRAME_MARK = "#t="  # between a video's path and a moment in a frame's key
_KEY = re.compile(r"^(?P<path>.+)#t=(?P<t>\d+(?:\.\d+)?)$")


class SamplingError(ValueError):
    """A video sampling option out of range: the interval or the frame cap."""


@dataclass(frozen=True)
class Sampling:
    """How a video becomes stills: a frame every `interval` seconds from the start, at most `max_frames`
    of them (a longer video's interval is widened to fit, see `sample_times`). The names say which option
    of `Collection.add`, the CLI and the service a bad value came from."""

    interval: float = DEFAULT_INTERVAL
    max_frames: int = DEFAULT_MAX_FRAMES

    @classmethod
    def of(cls, interval: float | None, max_frames: int | None) -> Sampling:
        """The options as a user gives them: None is the default."""
        return cls(
            DEFAULT_INTERVAL if interval is None else interval,
            DEFAULT_MAX_FRAMES if max_frames is None else max_frames,
        )

    def __post_init__(self) -> None:
        i, n = self.interval, self.max_frames
        if isinstance(i, bool) or not isinstance(i, numbers.Real) or not MIN_INTERVAL <= i < math.inf:
            raise SamplingError(
                f"video_interval must be a finite number of seconds >= {MIN_INTERVAL}, got {i!r}"
            )
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_FRAMES_LIMIT:
            raise SamplingError(
                f"video_max_frames must be a whole number from 1 to {MAX_FRAMES_LIMIT}, got {n!r}"
            )


@dataclass(frozen=True)
class VideoFrameItem:
    """One sampled moment of a video: `key` is `path#t=SECONDS` (the W3C media-fragment form a browser's
    video element seeks to), `metadata` is what a collection row stores about it."""

    path: str
    t: float
    started: datetime | None = None  # when the recording began, from the container's tags

    @property
    def key(self) -> str:
        return frame_key(self.path, self.t)

    @property
    def metadata(self) -> dict:
        """`video` and `t`, and `taken_at` (ISO 8601, the moment itself) when the video says when it began."""
        meta: dict = {"video": self.path, "t": self.t}
        if self.started is not None:
            when = self.started + timedelta(seconds=self.t)
            meta["taken_at"] = when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")
        return meta

    def load(self, max_pixels: int | None = MAX_PIXELS, max_aspect: float | None = MAX_ASPECT) -> Image.Image:
        return frame_at(self.path, self.t, max_pixels=max_pixels, max_aspect=max_aspect)


def frame_key(path: str | os.PathLike, t: float) -> str:
    return f"{os.fspath(path)}{FRAME_MARK}{round(t, 3)}"


def parse_frame_key(key: str) -> tuple[str, float] | None:
    """(video path, seconds) of a key made by `frame_key`; None for any other key."""
    m = _KEY.match(key)
    return (m["path"], float(m["t"])) if m else None


def sample_times(duration: float | None, interval: float, max_frames: int) -> list[float]:
    """0, interval, 2 * interval, ... before `duration`; when that is more than `max_frames` times, the interval
    is widened so that `max_frames` frames span the whole video. Unknown duration: the first `max_frames`."""
    if not interval > 0:
        raise ValueError(f"interval must be a positive number of seconds, got {interval}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if duration is not None:
        n = max(1, math.ceil(duration / interval))
        if n > max_frames:
            interval, n = duration / max_frames, max_frames
    else:
        n = max_frames
    return [round(i * interval, 3) for i in range(n)]


def keyframes(
    path: str | os.PathLike,
    interval: float = DEFAULT_INTERVAL,
    max_frames: int = DEFAULT_MAX_FRAMES,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> Iterator[tuple[float, Image.Image]]:
    """(seconds, RGB frame) every `interval` seconds from the start, at most `max_frames` of them."""
    for item, img in sampled_frames(path, interval, max_frames, max_pixels=max_pixels, max_aspect=max_aspect):
        yield item.t, img


def sampled_frames(
    path: str | os.PathLike,
    interval: float = DEFAULT_INTERVAL,
    max_frames: int = DEFAULT_MAX_FRAMES,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> Iterator[tuple[VideoFrameItem, Image.Image]]:
    """Each moment `keyframes` samples as an item (its key and row metadata) with its decoded RGB frame,
    from one opening of the file (what an index adds)."""
    label = os.fspath(path)
    with _open(label) as (container, stream):
        _check_stream(stream, label, max_pixels, max_aspect)
        started = recording_start(container.metadata)
        for t in sample_times(_duration(container, stream), interval, max_frames):
            img = _frame(container, stream, t, label, max_pixels, max_aspect)
            if img is None:  # past the end (a duration the container overstated, or none given)
                return
            yield VideoFrameItem(label, t, started), img


def video_items(
    path: str | os.PathLike, interval: float = DEFAULT_INTERVAL, max_frames: int = DEFAULT_MAX_FRAMES
) -> list[VideoFrameItem]:
    """The moments `keyframes` would sample, as items to decode later; nothing is decoded when the container
    states its duration. `path` is used as given: normalise it first if keys must be absolute."""
    label = os.fspath(path)
    with _open(label) as (container, stream):
        duration, started = _duration(container, stream), recording_start(container.metadata)
    if duration is None:  # decode to find out which moments exist
        return [item for item, _ in sampled_frames(label, interval, max_frames)]
    return [VideoFrameItem(label, t, started) for t in sample_times(duration, interval, max_frames)]


def recording_start(tags: dict[str, str]) -> datetime | None:
    """When a recording began, from container tags: Apple's local time with its offset first, then the
    muxer's `creation_time` (UTC). Unparseable values and the zero dates of cameras without a clock
    (1904, 1970) give None."""
    for key in ("com.apple.quicktime.creationdate", "creation_time"):
        try:
            when = datetime.fromisoformat(tags[key].strip())
        except (KeyError, ValueError, AttributeError):
            continue
        if when.year > 1970:
            return when
    return None


def frame_at(
    path: str | os.PathLike,
    t: float,
    *,
    max_pixels: int | None = MAX_PIXELS,
    max_aspect: float | None = MAX_ASPECT,
) -> Image.Image:
    """The first frame shown at or after `t` seconds."""
    img = _frame_or_none(path, t, max_pixels, max_aspect)
    if img is None:
        raise ImageError(f"{os.fspath(path)}: no frame at {t} s (the video is shorter)")
    return img


def has_frame_at(path: str | os.PathLike, t: float) -> bool:
    """Whether a frame is shown at or after `t` seconds: sampling stops at the first moment without one (the
    last frame's time is before the duration the container states)."""
    return _frame_or_none(path, t, MAX_PIXELS, MAX_ASPECT) is not None


def _frame_or_none(
    path: str | os.PathLike, t: float, max_pixels: int | None, max_aspect: float | None
) -> Image.Image | None:
    label = os.fspath(path)
    with _open(label) as (container, stream):
        _check_stream(stream, label, max_pixels, max_aspect)
        return _frame(container, stream, t, label, max_pixels, max_aspect)


@contextlib.contextmanager
def _open(label: str) -> Iterator[tuple]:
    """The container and its first video stream; FFmpeg's errors, here and in the body, become ImageError."""
    import av

    if not Path(label).is_file():
        raise ImageError(f"{label}: not a file")
    try:
        with av.open(label, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ImageError(f"{label}: has no video stream")
            yield container, container.streams.video[0]
    except (ImageError, MemoryError):
        raise
    except av.FFmpegError as e:
        raise ImageError(f"{label}: cannot decode video ({type(e).__name__}: {e})") from e


def _check_stream(stream, label: str, max_pixels: int | None, max_aspect: float | None) -> None:
    w, h = stream.codec_context.width, stream.codec_context.height
    if w and h:  # declared in the container: checked before anything is decoded
        check_size((w, h), max_pixels, max_aspect, label)


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        import av

        return container.duration / av.time_base
    return None


def _frame(container, stream, t: float, label: str, max_pixels: int | None, max_aspect: float | None):
    """Seek to the keyframe at or before `t`, decode forward to the first frame at or after it."""
    # Half a frame of slack, so that the frame whose timestamp rounds to t is taken, not the next one.
    rate = float(stream.average_rate) if stream.average_rate else 0.0
    slack = 0.5 / rate if rate > 0 else 1e-3
    if stream.time_base is not None:
        container.seek(int(t / stream.time_base), stream=stream, backward=True)
    else:
        container.seek(int(t * 1_000_000), backward=True)
    for frame in container.decode(stream):
        if frame.time is not None and frame.time < t - slack:
            continue
        check_size((frame.width, frame.height), max_pixels, max_aspect, label)
        return upright(frame.to_image(), frame.rotation)  # RGB
    return None


# PIL's turns, counter-clockwise, by quarter turns of the display matrix
_QUARTER_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def upright(img: Image.Image, rotation: float) -> Image.Image:
    """`img` as a player shows it: the display matrix turns the decoded picture `rotation` degrees
    counter-clockwise (PyAV's `VideoFrame.rotation`; -90 for a phone held upright). Angles that are not
    quarter turns, which no camera writes, go to the nearest one."""
    turn = _QUARTER_TURNS[round(rotation / 90) % 4]
    return img if turn is None else img.transpose(turn)
