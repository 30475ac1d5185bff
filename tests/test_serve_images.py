"""Uploads of extreme images to the service with a real (tiny) model, so requests go through `Preprocess`:
a strip of a few hundred bytes is refused with a 400 JSON error naming it, in bounded memory."""

from __future__ import annotations

import base64
import io

import pytest
from conftest import save_tiny_model
from memlimit import GB, address_space_cap
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.data.synthetic import shape_samples  # noqa: E402
from clipforge.encoder import Encoder  # noqa: E402
from clipforge.index import Collection  # noqa: E402
from clipforge.serve import ServeConfig, create_app  # noqa: E402


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-images")
    enc = Encoder.load(save_tiny_model(tmp / "model"))
    (tmp / "img").mkdir()
    for i, s in enumerate(shape_samples(4, size=40, seed=5)):
        s.image.save(tmp / "img" / f"{i}.png")
    with Collection.create(tmp / "col", identity=enc.identity, dim=enc.dim) as c:
        c.add([tmp / "img"], enc, workers=0)
    app = create_app(
        ServeConfig(collection=tmp / "col", thumb_dir=tmp / "thumbs", allowed_hosts=("testserver",)),
        encoder=enc,
    )
    with TestClient(app) as client:
        yield client


# 274 bytes; 2 KB; and 40,000,000 x 1 = exactly the service's 40 Mpx guard, 39 KB. Resizing the short side to
# the model's 32 px first asked for 32 x 6.4M, 32 x 64M and 32 x 1.28G pixels: a MemoryError (a 500) under
# the cap, the OOM killer without it.
STRIPS = [(200_000, 1), (1, 2_000_000), (40_000_000, 1)]


@pytest.mark.parametrize("size", STRIPS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_strip_is_a_400_naming_it(client, size):
    data = png(Image.new("L", size, 90))
    assert len(data) < 40_000
    with address_space_cap(2 * GB):
        r = client.post("/api/search", files={"image": ("strip.png", data, "image/png")}, data={"k": "2"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert f"{size[0]}x{size[1]} has an aspect ratio of" in error and "max_aspect" in error
        assert error.startswith("image 0:")  # the request's field, not a server path
        r = client.post("/api/embed", json={"images": [base64.b64encode(data).decode()]})
        assert r.status_code == 400 and "max_aspect" in r.json()["error"]


def test_a_wide_image_within_the_limit_is_searched(client):
    data = png(Image.new("RGB", (400, 2), (200, 30, 30)))  # exactly 200:1
    r = client.post("/api/search", files={"image": ("wide.png", data, "image/png")}, data={"k": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_a_raw_file_pillow_cannot_identify_is_searched_by(client):
    from media_files import bayer, dng_bytes, jpeg_bytes

    # A DNG under Panasonic's RW2 magic: LibRaw reads it, Pillow does not know the format.
    data = bytearray(
        dng_bytes(bayer((200, 100, 50)), jpeg_bytes(Image.new("RGB", (320, 240), (30, 60, 220))))
    )
    data[2:4] = b"U\x00"
    r = client.post("/api/search", files={"image": ("P1000001.RW2", bytes(data), "image/x-panasonic-rw2")})
    assert r.status_code == 200, r.text
