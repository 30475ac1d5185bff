"""EXIF metadata: date with offset, camera name, GPS, orientation from JPEG, HEIC, AVIF and DNG; malformed
tags are left out, never raised; a file that is not an image is the decoder's named error."""

from __future__ import annotations

from pathlib import Path

import pytest
from media_files import avif_bytes, bayer, dng_bytes, exif_bytes, heic_bytes, jpeg_bytes
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from clipforge.media.exif import read_metadata, row_metadata
from clipforge.transforms import ImageError

MAKE, MODEL, ORIENTATION = 0x010F, 0x0110, 0x0112
DATE, OFFSET, SUBSEC = 0x9003, 0x9011, 0x9291
IMG = Image.new("RGB", (64, 48), (90, 120, 30))
PHONE = exif_bytes(
    {MAKE: "Apple", MODEL: "iPhone 12 Pro", ORIENTATION: 6},
    {DATE: "2023:07:14 18:05:09", OFFSET: "+02:00", SUBSEC: "25"},
    {1: "N", 2: (48.0, 51.0, 29.88), 3: "W", 4: (2.0, 17.0, 40.2)},
)


def test_jpeg_gives_every_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jpg"
    path.write_bytes(jpeg_bytes(IMG, PHONE))
    want = {
        "taken_at": "2023-07-14T18:05:09.250+02:00",
        "camera": "Apple iPhone 12 Pro",
        "gps": {"lat": 48.8583, "lon": -2.2945},
        "orientation": 6,
    }
    assert read_metadata(path) == want
    assert read_metadata(path.read_bytes()) == want


@pytest.mark.parametrize("write", [heic_bytes, avif_bytes], ids=["heic", "avif"])
def test_heic_and_avif_carry_their_exif(write) -> None:
    meta = read_metadata(write(IMG, PHONE))
    assert meta["taken_at"] == "2023-07-14T18:05:09.250+02:00"
    assert meta["camera"] == "Apple iPhone 12 Pro" and meta["gps"] == {"lat": 48.8583, "lon": -2.2945}


def test_dng_carries_its_exif() -> None:
    data = dng_bytes(bayer((1, 2, 3)), jpeg_bytes(Image.new("RGB", (320, 240))), taken="2020:01:02 03:04:05")
    assert read_metadata(data, "x.dng") == {
        "taken_at": "2020-01-02T03:04:05",
        "camera": "Canon EOS 5D",
        "orientation": 1,
    }


def test_a_raw_pillow_cannot_parse_is_read_through_libraw() -> None:
    preview = jpeg_bytes(Image.new("RGB", (320, 240)))
    data = bytearray(dng_bytes(bayer((1, 2, 3)), preview, orientation=6, taken="2020:01:02 03:04:05"))
    data[2:4] = b"U\x00"  # Panasonic's RW2 magic: LibRaw reads it, Pillow does not know it
    want = {"taken_at": "2020-01-02T03:04:05", "camera": "Canon EOS 5D", "orientation": 6}
    assert read_metadata(bytes(data), "upload.raw") == want  # recognised by content, not by name


@pytest.mark.parametrize(
    "make, model, want",
    [
        ("NIKON CORPORATION", "NIKON D750", "NIKON D750"),
        ("Canon", "Canon EOS R5\x00\x00", "Canon EOS R5"),
        ("  SONY ", "ILCE-7M3", "SONY ILCE-7M3"),
        ("FUJIFILM", "", "FUJIFILM"),
        ("", "Pixel  7", "Pixel 7"),
    ],
)
def test_camera_name_is_make_and_model_once(make: str, model: str, want: str) -> None:
    assert read_metadata(jpeg_bytes(IMG, exif_bytes({MAKE: make, MODEL: model})))["camera"] == want


def test_malformed_tags_are_left_out_not_raised() -> None:
    bad = exif_bytes(
        {MAKE: "\x00\x00", ORIENTATION: 99},
        {DATE: "0000:00:00 00:00:00", OFFSET: "garbage"},
        {1: "N", 2: (IFDRational(1, 0), 0.0, 0.0), 4: (2.0, 0.0, 0.0)},
    )
    assert read_metadata(jpeg_bytes(IMG, bad)) == {}
    # A date with a malformed offset keeps the date, without an offset.
    odd = exif_bytes({}, {DATE: "2001:02:03 04:05:06", OFFSET: "+99:00"})
    assert read_metadata(jpeg_bytes(IMG, odd)) == {"taken_at": "2001-02-03T04:05:06"}
    # An EXIF block that is garbage from its first byte.
    junk = jpeg_bytes(IMG, b"Exif\x00\x00" + bytes(range(256)) * 4)
    assert read_metadata(junk) == {}
    assert read_metadata(jpeg_bytes(IMG)) == {}


def test_a_file_that_is_not_an_image_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"hello, not a picture")
    with pytest.raises(ImageError, match=rf"^{path}: not a recognised image file"):
        read_metadata(path)
    with pytest.raises(ImageError, match=r"^cut\.jpg: "):
        read_metadata(jpeg_bytes(IMG, PHONE)[:20], name="cut.jpg")
    assert row_metadata(path) == {}


@pytest.mark.parametrize("pipeline", [False, True], ids=["encoder", "workers"])
def test_index_add_stores_the_exif_in_each_row(tmp_path: Path, pipeline: bool) -> None:
    from conftest import save_tiny_model
    from test_index_store import FakeEncoder

    from clipforge.encoder import Encoder
    from clipforge.index import Collection

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "phone.jpg").write_bytes(jpeg_bytes(IMG, PHONE))
    (folder / "plain.jpg").write_bytes(jpeg_bytes(IMG))
    # Inside the folder: its walk lists HEIC and RAW beside Pillow's extensions (data/sources.py IMAGE_SUFFIXES).
    heic, dng = folder / "IMG_0002.HEIC", folder / "IMG_0003.DNG"
    heic.write_bytes(heic_bytes(IMG, PHONE))
    dng.write_bytes(
        dng_bytes(bayer((90, 120, 30)), jpeg_bytes(Image.new("RGB", (320, 240))), taken="2020:01:02 03:04:05")
    )
    enc = Encoder.load(save_tiny_model(tmp_path / "model")) if pipeline else FakeEncoder()
    with Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim) as coll:
        report = coll.add([folder], enc, workers=0)
        assert report.failed == [] and report.skipped == [] and len(report.added) == 4
        again = coll.sync(folder, enc, workers=0)
        assert again.added == [] and again.removed == [] and len(again.unchanged) == 4
        meta = {Path(h.path).name: h.metadata for h in coll.search(vector=enc.embed_images([IMG])[0], k=5)}
    assert meta["phone.jpg"]["taken_at"] == "2023-07-14T18:05:09.250+02:00"
    assert meta["phone.jpg"]["camera"] == "Apple iPhone 12 Pro" and meta["phone.jpg"]["orientation"] == 6
    assert meta["plain.jpg"] == {}
    assert meta["IMG_0002.HEIC"]["camera"] == "Apple iPhone 12 Pro"
    assert meta["IMG_0003.DNG"] == {
        "taken_at": "2020-01-02T03:04:05",
        "camera": "Canon EOS 5D",
        "orientation": 1,
    }
