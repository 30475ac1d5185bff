"""Video frames sampled at a fixed interval: the right moments, the frame cap, items that point at a moment,
the size guards before decoding and named errors on broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media_files import write_video

from clipforge.media.video import (
    VideoFrameItem,
    frame_at,
    keyframes,
    parse_frame_key,
    recording_start,
    sample_times,
    video_items,
)
from clipforge.transforms import ImageError

FPS = 10


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, seconds=7.5, fps=FPS)
    return path


def level(img) -> float:
    return float(np.asarray(img, np.float32).mean())


def test_frames_are_the_moments_asked_for_not_the_keyframes_before_them(video: Path) -> None:
    got = list(keyframes(video, interval=1.5))
    assert [t for t, _ in got] == [0.0, 1.5, 3.0, 4.5, 6.0]
    for t, img in got:
        assert img.mode == "RGB" and img.size == (64, 48)
        # Frame i is grey 3 * i; the keyframe before 1.5 s (at 1.0 s) would be 30, not 45.
        assert abs(level(img) - 3 * t * FPS) <= 3, (t, level(img))


def test_a_long_video_is_thinned_to_the_frame_cap(video: Path) -> None:
    assert [t for t, _ in keyframes(video, interval=0.5, max_frames=3)] == [0.0, 2.5, 5.0]
    assert sample_times(None, 2.0, 3) == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="interval"):
        sample_times(10.0, 0.0, 3)


def test_items_point_at_a_moment_and_load_it(video: Path) -> None:
    items = video_items(video, interval=2.5)
    assert [i.key for i in items] == [f"{video}#t=0.0", f"{video}#t=2.5", f"{video}#t=5.0"]
    assert items[1].metadata == {"video": str(video), "t": 2.5}
    assert parse_frame_key(items[1].key) == (str(video), 2.5)
    assert parse_frame_key(str(video)) is None
    assert abs(level(items[1].load()) - 75) <= 3
    assert VideoFrameItem(str(video), 2.5) == items[1]


def test_size_guards_apply_before_decoding(video: Path) -> None:
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels exceeds the limit of 1000"):
        next(keyframes(video, max_pixels=1000))
    with pytest.raises(ImageError, match="aspect ratio"):
        frame_at(video, 0.0, max_aspect=1.2)


def test_broken_videos_are_named_errors(video: Path, tmp_path: Path) -> None:
    data = video.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00not a video" * 50)
    for bad in (cut, junk, tmp_path / "missing.mp4"):
        with pytest.raises(ImageError, match=rf"^{bad}: "):
            list(keyframes(bad))
    with pytest.raises(ImageError, match=r"no frame at 60"):
        frame_at(video, 60.0)


def test_items_carry_the_moment_they_were_recorded(tmp_path: Path) -> None:
    path = tmp_path / "phone.mp4"
    write_video(path, seconds=3.0, tags={"creation_time": "2023-07-14T18:05:09.000000Z"})
    items = video_items(path, interval=1.5)
    assert [i.metadata.get("taken_at") for i in items] == [
        "2023-07-14T18:05:09+00:00",
        "2023-07-14T18:05:10.500+00:00",
    ]
    # Apple's tag keeps the local offset and wins over the muxer's UTC time; zero dates and junk are no date.
    apple = {
        "com.apple.quicktime.creationdate": "2023-07-14T20:05:09+0200",
        "creation_time": "2023-07-14T18:05:09Z",
    }
    assert recording_start(apple).isoformat() == "2023-07-14T20:05:09+02:00"
    assert recording_start({"creation_time": "1970-01-01T00:00:00.000000Z"}) is None
    assert recording_start({"creation_time": "yesterday"}) is None
    assert "taken_at" not in VideoFrameItem("v.mp4", 1.0).metadata
