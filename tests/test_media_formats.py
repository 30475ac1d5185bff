"""HEIC/HEIF, AVIF and camera RAW through the one decoder, `load_image`, with its guards and named errors."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from media_files import avif_bytes, bayer, dng_bytes, exif_bytes, heic_bytes, jpeg_bytes
from PIL import Image

from clipforge.media.raw import MIN_PREVIEW_SIDE, is_raw
from clipforge.transforms import ImageError, load_image

RED = (200, 30, 30)


def mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32).reshape(-1, 3).mean(0)


def picture(size: tuple[int, int] = (64, 48)) -> Image.Image:
    # Left half red, right half blue: orientation is visible in where the red is.
    img = Image.new("RGB", size, (30, 30, 200))
    img.paste(RED, (0, 0, size[0] // 2, size[1]))
    return img


@pytest.mark.parametrize("write", [heic_bytes, avif_bytes], ids=["heic", "avif"])
def test_heic_and_avif_decode_from_a_path_and_from_bytes(tmp_path: Path, write) -> None:
    data = write(picture())
    path = tmp_path / "photo.img"  # the extension does not matter: the content says what it is
    path.write_bytes(data)
    for src in (path, data):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (64, 48)
        left, right = (
            np.asarray(img, np.float32)[:, :8].mean((0, 1)),
            np.asarray(img, np.float32)[:, -8:].mean((0, 1)),
        )
        assert np.abs(left - RED).max() < 25 and right[2] > 150


@pytest.mark.parametrize("write", [heic_bytes, avif_bytes], ids=["heic", "avif"])
def test_heic_and_avif_orientation_is_applied_once(write) -> None:
    img = load_image(write(picture(), exif_bytes({0x0112: 6})))
    a = np.asarray(img, np.float32)
    assert img.size == (48, 64)  # rotated 90 degrees clockwise: the red left half is now on top
    assert np.abs(a[:8].mean((0, 1)) - RED).max() < 25 and a[-8:].mean((0, 1))[2] > 150


@pytest.mark.parametrize("write", [heic_bytes, avif_bytes], ids=["heic", "avif"])
def test_heic_and_avif_guards_and_corruption_are_named_errors(write) -> None:
    data = write(picture())
    with pytest.raises(ImageError, match=r"64x48 = 3072 pixels exceeds the limit of 3000"):
        load_image(data, max_pixels=3000, name="p.heic")
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(write(picture((400, 1))), max_aspect=100, name="p.heic")
    for cut in (len(data) // 2, len(data) - 40):
        with pytest.raises(ImageError, match=r"^p\.heic: "):
            load_image(data[:cut], name="p.heic")


def test_dng_gives_its_preview_upright() -> None:
    preview = jpeg_bytes(picture((320, 240)))
    data = dng_bytes(bayer((30, 30, 200)), preview, orientation=6)
    img = load_image(data, name="IMG_0001.DNG")
    assert img.size == (240, 320)  # the preview, turned by the file's orientation
    assert np.abs(np.asarray(img, np.float32)[:16].mean((0, 1)) - RED).max() < 25


@pytest.mark.parametrize("with_preview", [False, True], ids=["none", "thumbnail"])
def test_dng_without_a_usable_preview_develops_the_sensor_data(with_preview: bool) -> None:
    small = MIN_PREVIEW_SIDE - 1
    preview = jpeg_bytes(Image.new("RGB", (small + 40, small), RED)) if with_preview else None
    data = dng_bytes(bayer((200, 200, 200), size=(96, 64)), preview)
    img = load_image(data, name="x.dng")
    assert img.size == (48, 32)  # the 96x64 sensor developed at half size, not the preview
    assert mean_colour(img).min() > 100  # light grey data came out light, not black


def test_raw_is_recognised_by_content_without_a_name() -> None:
    data = dng_bytes(bayer((200, 200, 200)), jpeg_bytes(picture((320, 240))))
    assert is_raw(io.BytesIO(data))
    assert not is_raw(io.BytesIO(jpeg_bytes(picture())))
    # Read by Pillow as a TIFF this would be the preview anyway; the point is that rawpy was asked.
    assert load_image(io.BytesIO(data)).size == (320, 240)
    # A plain TIFF stays Pillow's.
    b = io.BytesIO()
    picture().save(b, "TIFF")
    assert not is_raw(io.BytesIO(b.getvalue())) and load_image(b.getvalue()).size == (64, 48)


def test_raw_guards_apply_before_decoding() -> None:
    data = dng_bytes(bayer((200, 200, 200), size=(96, 64)), jpeg_bytes(picture((320, 240))))
    # The sensor's 96x64 passes, the 320x240 preview does not: refused from its header, not decoded.
    with pytest.raises(ImageError, match=r"x\.dng: 320x240 = 76800 pixels exceeds the limit of 10000"):
        load_image(data, max_pixels=10_000, name="x.dng")
    with pytest.raises(ImageError, match=r"96x64 = 6144 pixels exceeds the limit of 5000"):
        load_image(data, max_pixels=5_000, name="x.dng")
    strip = dng_bytes(bayer((200, 200, 200), size=(480, 24)))  # LibRaw refuses sides under 22 itself
    assert load_image(strip, name="strip.dng").size == (240, 12)
    with pytest.raises(ImageError, match=r"480x24 has an aspect ratio of 20:1, over the limit of 10:1"):
        load_image(strip, max_aspect=10, name="strip.dng")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it reads past
def test_corrupt_raw_files_are_named_errors(tmp_path: Path) -> None:
    data = dng_bytes(bayer((200, 200, 200), size=(96, 64)))  # no preview: the sensor data must be read
    for cut in (len(data) // 2, 200, 12):
        path = tmp_path / f"cut{cut}.nef"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageError, match=rf"^{path}: "):
            load_image(path)
    junk = tmp_path / "junk.cr2"
    junk.write_bytes(b"not a raw file at all" * 20)
    with pytest.raises(ImageError, match="not a recognised image file"):
        load_image(junk)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF it reads past
def test_mutated_raw_files_decode_or_fail_with_a_named_error() -> None:
    # LibRaw parses what the file says about itself; whatever a corrupted header claims, the result is an
    # image within the limits or an ImageError, never another exception (or a crash of the process).
    rng = random.Random(0)
    bases = [dng_bytes(bayer((200, 100, 50))), dng_bytes(bayer((9, 9, 9)), jpeg_bytes(picture((320, 240))))]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 8)):  # mostly the header and IFDs, sometimes anywhere
            data[rng.randrange(400) if rng.random() < 0.8 else rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        try:
            img = load_image(bytes(data), name="f.dng", max_pixels=100_000)
        except ImageError:
            outcomes["error"] += 1
        else:
            assert img.mode == "RGB" and img.width * img.height <= 100_000
            outcomes["ok"] += 1
    assert min(outcomes.values()) > 30, outcomes  # both outcomes exercised


def test_without_rawpy_a_dng_is_read_as_the_tiff_it_also_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)  # what `import rawpy` meets without the [media] extra
    data = dng_bytes(bayer((30, 30, 200)), jpeg_bytes(picture((320, 240))))
    assert load_image(data, name="x.dng").size == (320, 240)  # Pillow's TIFF reader: the preview in IFD0
    with pytest.raises(ImageError, match=r"^y\.dng: "):
        load_image(dng_bytes(bayer((30, 30, 200))), name="y.dng")  # 16-bit CFA data: Pillow cannot
