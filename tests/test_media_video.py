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


def test_a_phone_video_comes_out_upright(tmp_path: Path) -> None:
    # A phone held upright records 64x48 pictures whose top is the phone's right side, and a display matrix
    # that turns them a quarter clockwise (-90 counter-clockwise); a quarter the other way for the other hand.
    def top_white(_: int) -> np.ndarray:
        arr = np.zeros((48, 64, 3), np.uint8)
        arr[:24] = 255
        return arr

    for rotation, white_side in ((-90, "right"), (90, "left"), (180, "bottom")):
        path = tmp_path / f"portrait{rotation}.mp4"
        write_video(path, seconds=1.0, rotation=rotation, draw=top_white)
        [(_, img)] = list(keyframes(path))
        a = np.asarray(img, np.float32).mean(axis=2)
        h, w = a.shape
        assert (w, h) == ((64, 48) if rotation == 180 else (48, 64)), rotation
        halves = {
            "right": (a[:, w // 2 :], a[:, : w // 2]),
            "left": (a[:, : w // 2], a[:, w // 2 :]),
            "bottom": (a[h // 2 :], a[: h // 2]),
        }
        white, black = halves[white_side]
        assert white.mean() > 200 and black.mean() < 55, (rotation, white.mean(), black.mean())


# ---- videos in a collection: `index add` and `index sync` -------------------------------------------------


class MeanEncoder:
    """Fake CLIP: an image's vector is its mean colour plus a constant (so no vector is zero)."""

    identity = {"model": "mean-fake", "fingerprint": "fake:mean:1", "dim": 4}
    dim = 4
    logit_scale = 100.0

    def embed_images(self, images: list) -> np.ndarray:
        return np.array([[*np.asarray(im, np.float32).mean(axis=(0, 1)) / 255, 0.1] for im in images])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return np.tile([0.0, 0.0, 0.0, 1.0], (len(texts), 1))


def frame_rows(col, folder: Path) -> dict[str, dict]:
    """key -> metadata of every row under `folder`."""
    return {key: col.get(ids[0]).metadata for key, ids in col.keys_under(folder).items()}


def test_a_folder_with_videos_adds_a_row_per_sampled_frame(tmp_path: Path) -> None:
    from PIL import Image

    from clipforge.index import Collection

    folder = tmp_path / "library"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "photo.png")
    write_video(folder / "clip.mp4", seconds=7.5, tags={"creation_time": "2023-07-14T18:05:09Z"})
    (folder / "broken.mov").write_bytes(b"\x00not a video" * 50)
    (folder / "notes.txt").write_text("not media")
    enc = MeanEncoder()
    with Collection.create(tmp_path / "col", identity=enc.identity, dim=enc.dim) as col:
        report = col.add(folder, enc, workers=0)
        clip = str(folder / "clip.mp4")
        assert report.added == [str(folder / "photo.png"), clip]  # the video once, not once per frame
        [(bad, reason)] = report.failed  # named, and the rest of the folder still added
        assert bad == str(folder / "broken.mov") and reason.startswith("cannot decode video"), reason
        assert report.skipped == [str(folder / "notes.txt")]
        rows = frame_rows(col, folder)
        assert rows[f"{clip}#t=5.0"] == {"video": clip, "t": 5.0, "taken_at": "2023-07-14T18:05:14+00:00"}
        assert sorted(rows) == sorted([str(folder / "photo.png"), f"{clip}#t=0.0", f"{clip}#t=5.0"])
        # Each frame's vector is its own moment: frame 50 (5 s) is grey 150, frame 0 black.
        v = col.vectors(col.keys_under(folder)[f"{clip}#t=5.0"])[0]
        assert abs(v[0] / v[3] * 0.1 - 150 / 255) < 0.02, v
        again = col.add(folder, enc, workers=0)
        assert again.added == [] and clip in again.unchanged


def test_sync_removes_a_deleted_video_and_replaces_a_changed_one(tmp_path: Path) -> None:
    from clipforge.index import Collection

    folder = tmp_path / "library"
    folder.mkdir()
    keep, change, delete = (folder / f"{n}.mp4" for n in ("keep", "change", "delete"))
    for p in (keep, change, delete):
        write_video(p, seconds=7.5)
    enc = MeanEncoder()
    with Collection.create(tmp_path / "col", identity=enc.identity, dim=enc.dim) as col:
        col.sync(folder, enc, workers=0)
        assert len(col.keys_under(folder)) == 6
        delete.unlink()
        write_video(change, seconds=12.0, fps=5)  # now three frames: 0, 5 and 10 s
        report = col.sync(folder, enc, workers=0)
        assert report.removed == [str(delete)]
        assert report.updated == [str(change)] and report.unchanged == [str(keep)]
        assert sorted(col.keys_under(folder)) == sorted(
            [f"{change}#t=0.0", f"{change}#t=5.0", f"{change}#t=10.0", f"{keep}#t=0.0", f"{keep}#t=5.0"]
        )
        assert col.sync(folder, enc, workers=0).removed == []  # frame keys are not mistaken for lost files
        assert col.remove(str(keep)) == 2  # a video's path removes all its frames
        assert sorted(col.keys_under(folder)) == [f"{change}#t=0.0", f"{change}#t=10.0", f"{change}#t=5.0"]


def test_the_sampling_is_settable_and_a_new_one_resamples_a_stored_video(tmp_path: Path) -> None:
    from clipforge.index import Collection, SamplingError

    folder = tmp_path / "library"
    folder.mkdir()
    clip = folder / "clip.mp4"
    write_video(clip, seconds=7.5)
    enc = MeanEncoder()

    def moments(col) -> list[float]:
        return sorted(parse_frame_key(key)[1] for key in col.keys_under(folder))

    with Collection.create(tmp_path / "col", identity=enc.identity, dim=enc.dim) as col:
        assert col.add(folder, enc, workers=0, video_interval=2.5).added == [str(clip)]
        assert moments(col) == [0.0, 2.5, 5.0]
        # Not asked: the stored sampling stays, whether by add or by sync.
        assert col.add(folder, enc, workers=0).unchanged == [str(clip)]
        assert col.sync(folder, enc, workers=0).unchanged == [str(clip)]
        assert col.add(clip, enc, workers=0, video_interval=2.5).unchanged == [str(clip)]  # same moments
        assert moments(col) == [0.0, 2.5, 5.0]
        # Asked for other moments: the unchanged file is sampled again, its old frames replaced.
        assert col.add(folder, enc, workers=0, video_max_frames=2).updated == [str(clip)]
        assert moments(col) == [0.0, 5.0]  # the default 5 s interval, two frames
        assert col.sync(folder, enc, workers=0, video_max_frames=1).updated == [str(clip)]
        assert moments(col) == [0.0]
        # Frame i is grey 3 * i: the moment at 2.5 s (frame 25) is the 2.5 s frame, not the 5 s one.
        col.add(folder, enc, workers=0, video_interval=2.5)
        v = col.vectors(col.keys_under(folder)[f"{clip}#t=2.5"])[0]
        assert abs(v[0] / v[3] * 0.1 - 75 / 255) < 0.02, v
        for bad in (0, -1.0, float("nan"), float("inf"), 0.0001, "5", True):
            with pytest.raises(SamplingError, match="video_interval"):
                col.add(folder, enc, workers=0, video_interval=bad)
        for bad in (0, -3, 1.5, True, 10**6):
            with pytest.raises(SamplingError, match="video_max_frames"):
                col.sync(folder, enc, workers=0, video_max_frames=bad)
        assert moments(col) == [0.0, 2.5, 5.0]  # nothing was touched by the refused calls
        # 7.49 s asks for 0 and 7.49 s, but the last frame is shown from 7.4 s: sampling stops after 0 s,
        # and asking again for the same finds the video sampled as asked (not re-sampled at every add).
        assert col.add(clip, enc, workers=0, video_interval=7.49).updated == [str(clip)]
        assert moments(col) == [0.0]
        assert col.add(clip, enc, workers=0, video_interval=7.49).unchanged == [str(clip)]
        assert col.add(clip, enc, workers=0, video_interval=7.5).unchanged == [str(clip)]  # also just 0 s
        assert col.add(clip, enc, workers=0, video_interval=7.4).updated == [str(clip)]  # 0 and 7.4 s
        assert moments(col) == [0.0, 7.4]


def test_index_add_and_sync_take_videos_from_the_command_line(tmp_path: Path, capsys) -> None:
    import json

    from conftest import save_tiny_model
    from PIL import Image

    from clipforge.cli import main

    def run(*args) -> dict:
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    model = save_tiny_model(tmp_path / "model")  # a real Encoder: images decode in its pipeline, videos here
    folder = tmp_path / "library"
    folder.mkdir()
    Image.new("RGB", (40, 40), "blue").save(folder / "photo.png")
    write_video(folder / "clip.mp4", seconds=7.5)
    (folder / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    col = tmp_path / "col"
    run("index", "create", col, "--model", model, "--json")
    out = run("index", "add", col, folder, "--workers", "0", "--json")
    assert (out["added"], out["rows"]) == (2, 3), out  # the photo, the video's two moments
    [failure] = out["failed"]
    assert failure["path"] == str(folder / "broken.mp4")
    assert failure["reason"].startswith("cannot decode video"), failure
    out = run("index", "add", col, folder, "--workers", "0", "--video-interval", "2.5", "--json")
    assert (out["updated"], out["rows"]) == (1, 4), out  # the same video, now three moments
    out = run("index", "sync", col, folder, "--workers", "0", "--video-max-frames", "2", "--json")
    assert (out["updated"], out["rows"]) == (1, 3), out
    for flag, value in (("--video-interval", "nan"), ("--video-max-frames", "0")):
        assert main(["index", "add", str(col), str(folder), flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and flag.strip("-").replace("-", "_") in err, err
    (folder / "clip.mp4").unlink()
    out = run("index", "sync", col, folder, "--workers", "0", "--json")
    assert (out["removed"], out["unchanged"], out["rows"]) == (1, 1, 1), out
