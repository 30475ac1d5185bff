"""The HTTP API (clipforge.serve) with FastAPI's TestClient: every endpoint and every error case.

The encoder is a fake with known answers: it reads the colour and the shape off a synthetic image and the
colour and shape words off a text, so the right ranking and the right probabilities are known exactly.
The browser and fuzz tests import the fixtures' helpers from here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
from fastapi.testclient import TestClient  # noqa: E402

from clipforge.data.synthetic import COLORS, SHAPES, draw_shape, write_shapes  # noqa: E402
from clipforge.index import Collection, db  # noqa: E402
from clipforge.serve import ServeConfig, create_app  # noqa: E402
from clipforge.serve.bodies import MAX_JSON_DEPTH  # noqa: E402
from clipforge.serve.schemas import MAX_TEXT_CHARS  # noqa: E402
from clipforge.transforms import load_image  # noqa: E402

NAMES = list(COLORS)
DIM = len(COLORS) + len(SHAPES) + 1
TOKEN = "test-token-123"


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def shape_of(mask: np.ndarray) -> str:
    """Which synthetic shape a foreground mask is: squares fill their box, circles ~0.79 of it, triangles put
    a quarter of their area in the top half, crosses half."""
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    return "triangle" if (ys < ys.min() + h / 2).mean() < 0.4 else "cross"


class ShapeEncoder:
    """Fake CLIP: one axis per colour and per shape, plus a small constant axis (so no vector is zero)."""

    identity = {"model": "shape-fake", "fingerprint": "fake:shapes:1", "dim": DIM}
    dim = DIM
    logit_scale = 100.0

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.text_calls: list[int] = []

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.delay)
        self.text_calls.append(len(texts))
        out = [np.zeros((0, DIM), np.float32)]
        for t in texts:
            v = np.zeros(DIM)
            v[-1] = 0.1
            v[: len(NAMES)] = [c in t for c in NAMES]
            v[len(NAMES) : -1] = [s in t for s in SHAPES]
            out.append(_unit(v)[None])
        return np.concatenate(out)

    def embed_images(self, images: list) -> np.ndarray:
        out = [np.zeros((0, DIM), np.float32)]
        for im in images:
            a = np.asarray(load_image(im), np.float32)
            mask = (a < 235).any(axis=2)
            v = np.zeros(DIM)
            v[-1] = 0.1
            if mask.any():
                mean = a[mask].mean(axis=0)
                v[int(np.argmin([np.linalg.norm(mean - np.array(COLORS[n])) for n in NAMES]))] = 1
                v[len(NAMES) + SHAPES.index(shape_of(mask))] = 1
            out.append(_unit(v)[None])
        return np.concatenate(out)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def shape_png(color: str, shape: str, seed: int = 7) -> bytes:
    import random

    return png_bytes(draw_shape(color, shape, 64, random.Random(seed)))


def build_collection(root: Path, n: int = 48, captions: bool = True) -> tuple[Path, dict[int, str]]:
    """A collection of n synthetic shape images (+ two captions); returns (folder, id -> label)."""
    manifest = write_shapes(root / "shapes", n, seed=1)
    labels = {
        str((root / "shapes" / json.loads(line)["image"]).absolute()): json.loads(line)["label"]
        for line in manifest.read_text().splitlines()
    }
    enc = ShapeEncoder()
    with Collection.create(root / "col", identity=enc.identity, dim=enc.dim) as c:
        c.add([root / "shapes" / "images"], enc)
        if captions:
            c.add_texts(["a purple cross, in words", "notes about a green square"], enc)
        by_id = {h.id: labels.get(h.path or "", "text") for h in (c.get(i) for i in range(1, n + 3)) if h}
    return root / "col", by_id


def make_config(col: Path, tmp: Path, **kw) -> ServeConfig:
    kw.setdefault("allowed_hosts", ("testserver",))  # the Host header FastAPI's TestClient sends
    return ServeConfig(collection=col, thumb_dir=tmp / "thumbs", **kw)


@contextlib.contextmanager
def running_server(app, lifespan: str = "off") -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL. The app's lifespan
    (which closes its engine) is left to whoever made the app, unless `lifespan="on"`."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    col, labels = build_collection(tmp)
    policy = tmp / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "neutral": ["blue", "green", "yellow"],
                "categories": [{"name": "red things", "prompts": ["red"], "threshold": 0.6}],
            }
        )
    )
    app = create_app(
        make_config(col, tmp, token=TOKEN, policy=policy, max_upload_bytes=300_000, max_pixels=1_000_000),
        encoder=ShapeEncoder(),
    )
    with TestClient(app) as client:
        yield client, labels, tmp


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def error_of(r) -> str:
    body = r.json()
    assert set(body) <= {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    return body["error"]


# ---------------------------------------------------------------------------------------------- search
def test_text_search_ranks_the_named_shape_first(served):
    client, labels, _ = served
    r = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert r.status_code == 200
    res = r.json()["results"]
    images = [h for h in res if h["image_url"]]
    assert [labels[h["id"]] for h in images[:2]] == ["red circle", "red circle"]  # 48 images: 2 per class
    assert images[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert images[0]["thumb_url"] == f"/api/thumbs/{images[0]['id']}"
    assert images[0]["name"].endswith(".png") and "/" not in images[0]["name"]  # never the server path


def test_scores_equal_cosines_computed_by_hand(served):
    client, labels, tmp = served
    enc = ShapeEncoder()
    q = enc.embed_texts(["blue triangle"])[0]
    res = client.post("/api/search", json={"text": "blue triangle", "k": 60}).json()["results"]
    for h in res:
        ref = enc.embed_texts([labels[h["id"]]])[0] if h["image_url"] else enc.embed_texts([h["caption"]])[0]
        assert h["score"] == pytest.approx(float(q @ ref), abs=1e-5)
    assert [h["score"] for h in res] == sorted((h["score"] for h in res), reverse=True)


def test_paging_returns_consecutive_slices(served):
    client, _, _ = served
    full = client.get("/api/search", params={"q": "green", "k": 12}).json()["results"]
    p1 = client.get("/api/search", params={"q": "green", "k": 6}).json()["results"]
    p2 = client.get("/api/search", params={"q": "green", "k": 6, "offset": 6}).json()["results"]
    assert [h["score"] for h in p1 + p2] == pytest.approx([h["score"] for h in full])


def test_image_search_by_upload_and_by_base64(served):
    client, labels, _ = served
    png = shape_png("yellow", "triangle")
    up = client.post("/api/search", files={"image": ("q.png", png, "image/png")}, data={"k": "2"})
    js = client.post("/api/search", json={"image": "data:image/png;base64," + b64(png), "k": 2})
    for r in (up, js):
        assert r.status_code == 200, r.text
        assert [labels[h["id"]] for h in r.json()["results"]] == ["yellow triangle", "yellow triangle"]


def test_more_like_this_weights_negative_and_filters(served):
    client, labels, _ = served
    some = next(i for i, lab in labels.items() if lab == "orange square")
    like = client.post("/api/search", json={"like": some, "k": 2}).json()["results"]
    assert [labels[h["id"]] for h in like] == ["orange square", "orange square"]
    # "square" minus "orange": squares of other colours come before the orange ones.
    neg = client.post(
        "/api/search", json={"text": "square", "negative": "orange", "negative_weight": 1.0, "k": 3}
    )
    assert all(
        labels[h["id"]].endswith("square") and "orange" not in labels[h["id"]] for h in neg.json()["results"]
    )
    # Text weight 0 leaves only the image part of a mixed query.
    mixed = client.post(
        "/api/search",
        json={"text": "blue", "image": b64(shape_png("red", "cross")), "weights": [0, 1], "k": 1},
    )
    assert labels[mixed.json()["results"][0]["id"]] == "red cross"
    none = client.post("/api/search", json={"text": "red", "path_prefix": "/no/such/folder"}).json()[
        "results"
    ]
    assert none == []
    later = client.post("/api/search", json={"text": "red", "added_after": time.time() + 3600}).json()[
        "results"
    ]
    assert later == []


def test_search_errors(served):
    client, _, _ = served
    cases = [
        (client.get("/api/search", params={"q": "x", "k": 0}), 422),
        (client.get("/api/search", params={"q": "x", "k": 20000}), 422),
        (client.get("/api/search", params={"q": "x", "k": 1001}), 400),  # over the server's max_k
        (client.get("/api/search", params={"q": "x", "k": "many"}), 422),
        (client.get("/api/search"), 422),  # missing q
        (client.post("/api/search", content=b"{not json"), 400),
        (client.post("/api/search", content=b"[1, 2]"), 400),
        (client.post("/api/search", content=b""), 400),
        (client.post("/api/search", json={}), 400),  # nothing to search for
        (client.post("/api/search", json={"text": "red", "colour": "x"}), 422),  # unknown field
        (client.post("/api/search", json={"text": "  "}), 400),
        (client.post("/api/search", json={"text": ["red"] * 300}), 400),
        (client.post("/api/search", content=b'{"text": "red", "weights": [NaN, 1]}'), 400),
        (client.post("/api/search", json={"text": "red", "weights": [1]}), 422),
        (client.post("/api/search", json={"vector": [0.1, 0.2]}), 400),  # wrong dimension
        (client.post("/api/search", json={"vector": [0.0] * DIM}), 400),  # zero query
        (client.post("/api/search", json={"vector": [1e39] * DIM}), 400),  # not finite in float32
        (client.post("/api/search", json={"like": 10**30}), 404),
        (client.post("/api/search", json={"like": 99999}), 404),
        (client.post("/api/search", json={"image": "%%%not base64%%%"}), 400),
        (client.post("/api/search", json={"image": b64(b"plain text, not a picture")}), 400),
        (client.post("/api/search", files={"file": ("a.png", shape_png("red", "circle"), "image/png")}), 400),
    ]
    for r, status in cases:
        assert r.status_code == status, (r.request.url, r.text)
        error_of(r)


def test_every_text_field_is_bounded(served):
    client, _, _ = served
    long = "red " * (MAX_TEXT_CHARS // 4) + "x"  # one character over the limit
    img = b64(shape_png("red", "circle"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    knn = {"indice_name": "col"}
    cases = [  # (method, path, JSON body or query, field the error must name)
        ("GET", "/api/search", {"q": long}, "query.q"),
        ("POST", "/api/search", {"text": long}, "text"),
        ("POST", "/api/search", {"text": ["red", long]}, "text.1"),
        ("POST", "/api/search", {"text": "red", "negative": long}, "negative"),
        ("POST", "/api/search", {"text": "red", "path_prefix": long}, "path_prefix"),
        ("POST", "/api/classify", {"image": img, "labels": ["red", long]}, "labels.1"),
        (
            "POST",
            "/api/classify",
            {"image": img, "labels": ["red"], "templates": [long + "{}"]},
            "templates.0",
        ),
        ("POST", "/api/embed", {"texts": [long]}, "texts.0"),
        ("POST", "/api/index/add", {"texts": [long]}, "texts.0"),
        ("POST", "/api/index/add", {"paths": [long]}, "paths.0"),
        ("POST", "/knn-service", {**knn, "text": long}, "text"),
        ("POST", "/knn-service", {"indice_name": long, "text": "red"}, "indice_name"),
        ("POST", "/metadata", {"ids": [1], "indice_name": long}, "indice_name"),
    ]
    for method, path, payload, field in cases:
        if method == "GET":
            r = client.get(path, params=payload)
        else:
            r = client.post(path, content=json.dumps(payload), headers=auth)
        assert r.status_code == 422, (path, field, r.text[:200])
        assert f" {field}: " in error_of(r) and str(MAX_TEXT_CHARS) in error_of(r), (path, error_of(r))
    # The same limits apply to form fields, and the limit itself is allowed.
    r = client.post(
        "/api/search", data={"text": long}, files={"image": ("a.png", shape_png("red", "circle"))}
    )
    assert r.status_code == 422 and "text" in error_of(r)
    assert client.get("/api/search", params={"q": long[:MAX_TEXT_CHARS]}).status_code == 200
    # Counts: more paths than the server takes per request, and a list of labels past the schema's bound.
    r = client.post("/api/index/add", json={"paths": ["/no/such"] * 300}, headers=auth)
    assert r.status_code == 400 and "paths" in error_of(r)
    r = client.post("/api/classify", json={"image": img, "labels": [f"l{i}" for i in range(10_001)]})
    assert r.status_code == 422 and "labels" in error_of(r)


def test_abandoned_requests_are_not_encoded(tmp_path):
    """A request that times out while its text waits for the encoder is dropped from the batcher's queue."""
    col, _ = build_collection(tmp_path, n=24, captions=False)
    gate = threading.Event()

    class Gated(ShapeEncoder):
        seen: list[str] = []

        def embed_texts(self, texts: list[str]) -> np.ndarray:
            self.seen.extend(texts)
            if "hold" in texts[0]:
                gate.wait(10)
            return super().embed_texts(texts)

    enc = Gated()
    app = create_app(make_config(col, tmp_path, request_timeout_s=0.5), encoder=enc)
    with TestClient(app) as client:
        first: dict = {}
        holder = threading.Thread(
            target=lambda: first.update(r=client.get("/api/search", params={"q": "hold red"}))
        )
        holder.start()
        deadline = time.monotonic() + 5
        while not enc.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.get("/api/search", params={"q": "queued blue"})  # waits behind "hold red", times out
        assert r.status_code == 504
        gate.set()
        holder.join(10)
        assert first["r"].status_code == 504
        assert client.get("/api/search", params={"q": "green"}).status_code == 200  # the batcher still works
    assert "queued blue" not in enc.seen and enc.seen[0] == "hold red"


def test_deeply_nested_json_is_refused(served):
    client, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    deep = b"[" * 100_000 + b"]" * 100_000
    in_field = b'{"text": ' + deep + b"}"
    for path in ("/api/search", "/api/classify", "/api/moderate", "/api/embed", "/api/index/add"):
        for body in (deep, in_field):
            r = client.post(path, content=body, headers=auth)
            assert r.status_code == 400 and f"deeper than {MAX_JSON_DEPTH}" in error_of(r), (path, r.text)
    for path in ("/knn-service", "/metadata"):
        r = client.post(path, content=b'{"ids": ' + deep + b"}")
        assert r.status_code == 400 and "deeper" in error_of(r), (path, r.text)
    form = {"labels": "[" * 50_000 + "]" * 50_000}
    r = client.post("/api/classify", data=form, files={"image": ("a.png", shape_png("red", "cross"))})
    assert r.status_code in (400, 422) and error_of(r)
    # Brackets and escaped quotes inside strings are text, not nesting.
    text = '\\"' + "[" * 40 + "\\\\" + "{" * 40
    r = client.post("/api/search", content=b'{"text": "red ' + text.encode() + b'", "k": 1}')
    assert r.status_code == 200, r.text
    r = client.post("/api/search", content=b'{"text": "red", "vector": [[[[1]]]]}')
    assert r.status_code == 422  # shallow nesting reaches validation as before


def test_non_image_huge_upload_and_decompression_bomb(served):
    client, _, _ = served
    r = client.post("/api/search", files={"image": ("notes.txt", b"hello there", "text/plain")})
    assert r.status_code == 400 and "image" in error_of(r)
    huge = b"\0" * 400_000  # over the 300 kB body limit of this server
    r = client.post("/api/search", files={"image": ("big.png", huge, "image/png")})
    assert r.status_code == 413 and "300000 bytes" in error_of(r)
    # 2000 x 2000 = 4 Mpx compresses to a few kB but is over this server's 1 Mpx guard: refused from the header.
    bomb = png_bytes(Image.new("L", (2000, 2000)))
    assert len(bomb) < 300_000
    r = client.post("/api/search", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 400 and "exceeds the limit" in error_of(r)
    r = client.post("/api/embed", json={"images": [b64(bomb)]})
    assert r.status_code == 400


# -------------------------------------------------------------------------------------- classify, moderate
def test_classify_probabilities_match_a_hand_computed_softmax(served):
    client, _, _ = served
    enc = ShapeEncoder()
    png = shape_png("green", "triangle")
    labels = ["green triangle", "green square", "blue triangle", "red circle"]
    r = client.post("/api/classify", json={"image": b64(png), "labels": labels, "templates": ["a {}"]})
    assert r.status_code == 200, r.text
    got = {p["label"]: p["probability"] for p in r.json()["predictions"]}
    img = enc.embed_images([png])[0]
    w = enc.embed_texts([f"a {x}" for x in labels])
    logits = 100.0 * (w @ img)
    ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [got[x] for x in labels] == pytest.approx(ref.tolist(), abs=1e-6)
    assert r.json()["predictions"][0]["label"] == "green triangle"


def test_classify_by_upload_by_id_and_top_k(served):
    client, labels, _ = served
    form = {"labels": "purple cross, purple circle, red cross", "top_k": "2"}
    r = client.post(
        "/api/classify", files={"image": ("x.png", shape_png("purple", "cross"), "image/png")}, data=form
    )
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and preds[0]["label"] == "purple cross"
    some = next(i for i, lab in labels.items() if lab == "blue circle")
    r = client.post("/api/classify", json={"id": some, "labels": ["blue circle", "red square"]})
    assert r.json()["predictions"][0]["label"] == "blue circle"


def test_classify_errors(served):
    client, _, _ = served
    img = b64(shape_png("red", "circle"))
    cases = [
        (client.post("/api/classify", json={"image": img}), 422),  # no labels
        (client.post("/api/classify", json={"image": img, "labels": []}), 422),
        (client.post("/api/classify", json={"image": img, "labels": ["a", "a"]}), 400),
        (client.post("/api/classify", json={"image": img, "labels": ["a"], "templates": ["no slot"]}), 400),
        (client.post("/api/classify", json={"image": img, "labels": ["a"], "templates": ["{x} {}"]}), 400),
        (client.post("/api/classify", json={"labels": ["a"]}), 400),  # no image
        (client.post("/api/classify", json={"image": img, "id": 1, "labels": ["a"]}), 400),  # two images
        (client.post("/api/classify", json={"id": 424242, "labels": ["a"]}), 404),
        (client.post("/api/classify", json={"image": img, "labels": [f"l{i}" for i in range(300)]}), 400),
    ]
    for r, status in cases:
        assert r.status_code == status, r.text
        error_of(r)


def test_moderation_decisions(served):
    client, _, _ = served
    red = client.post("/api/moderate", json={"image": b64(shape_png("red", "square"))})
    blue = client.post("/api/moderate", files={"image": ("b.png", shape_png("blue", "square"), "image/png")})
    assert red.status_code == 200 and blue.status_code == 200, red.text
    assert red.json()["decision"] == "block" and blue.json()["decision"] == "allow"
    cat = red.json()["categories"][0]
    assert cat["name"] == "red things" and cat["score"] > 0.99 and cat["fired"] == ["red"]
    assert client.post("/api/moderate", json={}).status_code == 400


def test_moderation_without_a_policy_is_404(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    with TestClient(create_app(make_config(col, tmp_path), encoder=ShapeEncoder())) as client:
        r = client.post("/api/moderate", json={"image": b64(shape_png("red", "square"))})
        assert r.status_code == 404 and "--policy" in error_of(r)
        assert client.get("/api/info").json()["moderation"] is False


# ---------------------------------------------------------------------------------------- embed, files
def test_embed_returns_the_encoders_vectors(served):
    client, _, _ = served
    enc = ShapeEncoder()
    png = shape_png("orange", "cross")
    r = client.post("/api/embed", json={"texts": ["an orange cross", "blue"], "images": [b64(png)]})
    assert r.status_code == 200
    body = r.json()
    assert body["dim"] == DIM and body["model"] == "shape-fake"
    np.testing.assert_allclose(body["texts"], enc.embed_texts(["an orange cross", "blue"]), atol=1e-6)
    np.testing.assert_allclose(body["images"], enc.embed_images([png]), atol=1e-6)
    up = client.post("/api/embed", files={"image": ("a.png", png, "image/png")})
    np.testing.assert_allclose(up.json()["images"], body["images"], atol=1e-6)
    for bad in ({}, {"texts": [""]}, {"texts": "not a list"}, {"images": ["@@@"]}, {"texts": ["x"] * 300}):
        r = client.post("/api/embed", json=bad)
        assert r.status_code in (400, 422), (bad, r.text)
        error_of(r)


def test_images_and_thumbnails_by_id_only(served):
    client, labels, tmp = served
    some = next(i for i, lab in labels.items() if lab != "text")
    r = client.get(f"/api/images/{some}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    t = client.get(f"/api/thumbs/{some}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(t.content)).size) <= 256
    cached = list((tmp / "thumbs").glob(f"{some}-*.jpg"))
    assert len(cached) == 1 and client.get(f"/api/thumbs/{some}").content == cached[0].read_bytes()
    text_id = next(i for i, lab in labels.items() if lab == "text")
    for url in (
        f"/api/images/{text_id}",
        "/api/images/999999",
        "/api/thumbs/-3",
        f"/api/thumbs/{10**40}",
        "/api/items/999999",
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        error_of(r)
    for url in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/abc", "/api/thumbs/1.5"):
        assert client.get(url).status_code in (404, 422), url
    assert client.get(f"/api/items/{some}").json()["id"] == some


def collection_with_a_video(tmp_path: Path) -> tuple[Path, dict[int, str], Path, int]:
    """`build_collection` of 8 images plus a 7.5 s video (frame i is grey 3 * i: the moment at 5 s is grey
    150) -> (collection, labels, the video, the id of its moment at 5 s)."""
    from media_files import write_video

    col, labels = build_collection(tmp_path, n=8, captions=False)
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = videos / "clip.mp4"
    write_video(clip, seconds=7.5)
    with Collection.open(col) as c:
        c.add([videos], ShapeEncoder(), workers=0)
        moment = c.keys_under(videos)[f"{clip}#t=5.0"][0]
    return col, labels, clip, moment


def test_a_video_moment_serves_its_video_by_id_only(tmp_path):
    col, labels, clip, moment = collection_with_a_video(tmp_path)
    image_id = next(iter(labels))
    with TestClient(create_app(make_config(col, tmp_path), encoder=ShapeEncoder())) as client:
        hit = client.get(f"/api/items/{moment}").json()
        assert hit["video_url"] == f"/api/videos/{moment}" and hit["t"] == 5.0 and hit["name"] == "clip.mp4"
        assert hit["image_url"] is None and str(tmp_path) not in json.dumps(hit)  # never the server path
        r = client.get(hit["video_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.content == clip.read_bytes()
        # Byte ranges: what a browser's video element asks for to seek to the moment.
        part = client.get(hit["video_url"], headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == clip.read_bytes()[:100]
        thumb = client.get(hit["thumb_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert abs(np.asarray(Image.open(io.BytesIO(thumb.content)), np.float32).mean() - 150) < 6
        assert "/api/videos/" in error_of(client.get(f"/api/images/{moment}"))
        for url in (f"/api/videos/{image_id}", "/api/videos/999999", "/api/videos/-1"):
            r = client.get(url)
            assert r.status_code == 404, url
            error_of(r)
        for url in ("/api/videos/..%2F..%2Fetc%2Fpasswd", "/api/videos/abc"):
            assert client.get(url).status_code in (404, 422), url
        clip.unlink()
        assert "no longer on the server" in error_of(client.get(hit["video_url"]))


def test_clip_retrieval_links_a_video_moment_to_its_frame_and_its_video(tmp_path):
    """A moment has no image file of its own: its `url` is its frame (the thumbnail route), and its
    `video_url` the video opened at the moment; the video's server path is not shown."""
    col, _, clip, moment = collection_with_a_video(tmp_path)
    with Collection.open(col, readonly=True) as c:
        vec = c.vectors(np.array([moment]))[0].tolist()
    with TestClient(create_app(make_config(col, tmp_path), encoder=ShapeEncoder())) as client:
        [meta] = client.post("/metadata", content=json.dumps({"ids": [moment]})).json()
        body = {"embedding_input": vec, "modality": "image", "num_images": 10}
        found = client.post("/knn-service", content=json.dumps(body)).json()
        [hit] = [h for h in found if h["id"] == moment]
        for m in (meta["metadata"], hit):
            assert m["url"] == f"http://testserver/api/thumbs/{moment}", m
            assert m["video_url"] == f"http://testserver/api/videos/{moment}#t=5.0" and m["t"] == 5.0, m
            assert str(tmp_path) not in json.dumps(m)  # never the server path
        frame = client.get(hit["url"])
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
        assert abs(np.asarray(Image.open(io.BytesIO(frame.content)), np.float32).mean() - 150) < 6
        video = client.get(hit["video_url"])
        assert video.status_code == 200 and video.content == clip.read_bytes()
        image = next(h for h in found if h["id"] != moment and "video_url" not in h)
        assert (
            image["url"].endswith(f"/api/images/{image['id']}")
            and client.get(image["url"]).status_code == 200
        )


def test_the_add_route_samples_videos_as_asked(writable, tmp_path):
    from media_files import write_video

    client, col = writable
    auth = {"Authorization": f"Bearer {TOKEN}"}
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = videos / "clip.mp4"
    write_video(clip, seconds=7.5)
    for bad, name in (
        ({"video_interval": 0}, "video_interval"),
        ({"video_max_frames": 0}, "video_max_frames"),
    ):
        r = client.post("/api/index/add", json={"paths": [str(videos)], **bad}, headers=auth)
        assert r.status_code == 400 and name in error_of(r), r.text
    r = client.post("/api/index/add", json={"paths": [str(videos)], "video_interval": 2.5}, headers=auth)
    assert r.status_code == 200 and r.json()["added"] == 1 and len(r.json()["ids"]) == 3, r.text
    with Collection.open(col, readonly=True) as c:
        assert sorted(c.keys_under(videos)) == sorted(f"{clip}#t={t}" for t in ("0.0", "2.5", "5.0"))
    r = client.post("/api/index/add", json={"paths": [str(clip)], "video_max_frames": 1}, headers=auth)
    assert r.status_code == 200 and r.json()["updated"] == 1, r.text
    with Collection.open(col, readonly=True) as c:
        assert list(c.keys_under(videos)) == [f"{clip}#t=0.0"]


# ---------------------------------------------------------------------------------------- service
def test_health_info_metrics_openapi_and_page(served):
    client, labels, _ = served
    h = client.get("/healthz").json()
    assert h == {
        **h,
        "status": "ok",
        "model": "shape-fake",
        "dim": DIM,
        "writes_enabled": True,
        "moderation": True,
    }
    assert h["items"] == len(labels)  # no test writes to `served`
    client.get("/api/search", params={"q": "red"})
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert 'clipforge_http_requests_total{method="GET",route="/api/search",status="200"}' in m.text
    assert 'clipforge_http_request_duration_seconds_bucket{route="/api/search",le="+Inf"}' in m.text
    assert f"clipforge_collection_items {h['items']}" in m.text
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/search",
        "/api/classify",
        "/api/moderate",
        "/api/embed",
        "/api/images/{id}",
        "/api/thumbs/{id}",
        "/api/videos/{id}",
        "/healthz",
        "/api/index/add",
        "/api/index/{id}",
        "/knn-service",
    ):
        assert path in schema["paths"], path
    page = client.get("/")
    assert page.status_code == 200 and "<title>clipforge search</title>" in page.text
    assert "http" not in client.get("/static/app.js").text.split("no network", 1)[1]  # no CDN, no remote URL
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/no/such/page").json()["error"]


def test_concurrent_text_queries_are_batched(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    enc = ShapeEncoder(delay=0.05)
    app = create_app(make_config(col, tmp_path, batch_wait_ms=20.0), encoder=enc)
    eng = app.state.engine
    texts = [f"{c} {s}" for c in NAMES for s in SHAPES][:16]

    async def many() -> list[np.ndarray]:
        return await asyncio.gather(*(eng.embed_texts([t]) for t in texts))

    got = asyncio.run(many())
    np.testing.assert_allclose(np.concatenate(got), ShapeEncoder().embed_texts(texts), atol=1e-6)
    assert sum(enc.text_calls) == 16 and len(enc.text_calls) < 16  # grouped into fewer encoder calls
    calls = len(enc.text_calls)
    asyncio.run(many())  # a second time: served from the text cache
    assert len(enc.text_calls) == calls
    eng.close()


def test_slow_request_times_out_with_504(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    app = create_app(make_config(col, tmp_path, request_timeout_s=0.2), encoder=ShapeEncoder(delay=1.0))
    with TestClient(app) as client:
        r = client.get("/api/search", params={"q": "red circle"})
        assert r.status_code == 504 and "0.2 s" in error_of(r)


def test_cors_is_off_unless_configured(served, tmp_path):
    client, _, _ = served
    r = client.get("/healthz", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers
    col, _ = build_collection(tmp_path, n=24, captions=False)
    app = create_app(make_config(col, tmp_path, cors_origins=("http://ok.example",)), encoder=ShapeEncoder())
    with TestClient(app) as c2:
        r = c2.get("/healthz", headers={"Origin": "http://ok.example"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"


def test_model_mismatch_is_refused_at_startup(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    other = ShapeEncoder()
    other.identity = {"model": "other", "fingerprint": "fake:other", "dim": DIM}
    with pytest.raises(ValueError, match="built with"):
        create_app(make_config(col, tmp_path), encoder=other)


def test_host_header_must_name_this_server(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    config = make_config(
        col, tmp_path, allowed_hosts=("192.168.1.5", "Photos.LAN:8000", "[fd00::5]", "fd00::6")
    )
    with TestClient(create_app(config, encoder=ShapeEncoder())) as client:
        for host in (
            "localhost",
            "LOCALHOST:8000",
            "127.0.0.1",
            "127.0.0.1:65535",
            "[::1]",
            "[::1]:8000",
            "192.168.1.5:8000",
            "photos.lan",
            "[fd00::5]:80",
            "[FD00::6]",
        ):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
        for host in (
            "attacker.example",
            "attacker.example:8000",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "localhost:80@attacker.example",
            "localhost:abc",
            "::1",
            "[::1]x",
            "testserver",
        ):
            r = client.get("/healthz", headers={"Host": host})
            assert r.status_code == 400 and "--allow-host" in error_of(r), host
        # Refused before any work: no search, no image file, no write.
        bad = {"Host": "attacker.example"}
        assert client.post("/api/search", json={"text": "red"}, headers=bad).status_code == 400
        assert client.get("/api/images/1", headers=bad).status_code == 400
    with pytest.raises(ValueError, match="not a host name"):
        make_config(col, tmp_path, allowed_hosts=("photos.lan:http",))
    anyone = make_config(col, tmp_path, allowed_hosts=("*",))
    with TestClient(create_app(anyone, encoder=ShapeEncoder())) as client:
        assert client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 200


def test_cli_allow_host_reaches_the_app(tmp_path, monkeypatch):
    import uvicorn

    import clipforge.serve.app as app_module
    from clipforge.cli import main

    col, _ = build_collection(tmp_path, n=24, captions=False)
    monkeypatch.setattr(app_module, "load_encoder", lambda config, identity: ShapeEncoder())
    ran: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    argv = ["serve", str(col), "--host", "10.0.0.7", "--port", "9", "--allow-host", "photos.lan"]
    assert main([*argv, "--allow-host", "[fd00::5]"]) == 0
    with TestClient(ran["app"]) as client:
        for host, status in (
            ("photos.lan:9", 200),
            ("[fd00::5]:9", 200),
            ("10.0.0.7:9", 200),  # the bound address
            ("localhost:9", 200),
            ("attacker.example:9", 400),
        ):
            assert client.get("/healthz", headers={"Host": host}).status_code == status, host
    assert main(["serve", str(col), "--allow-host", "photos.lan:http"]) == 2  # one-line error, no traceback
    # With --workers N the settings reach each worker process in the uvicorn Config pickled to it (as a
    # spawned worker receives it), not through the environment, which the command leaves as it found it.
    import uvicorn.supervisors

    class Supervisor:
        def __init__(self, config, sockets, target=None):
            ran["workers_config"] = pickle.loads(pickle.dumps(config))

        def run(self):
            pass

    monkeypatch.setattr(uvicorn.supervisors, "Multiprocess", Supervisor)
    monkeypatch.setenv("CLIPFORGE_TOKEN", "s3cret")
    environ = dict(os.environ)
    workers = ["--workers", "2", "--max-k", "7", "--port", "0"]  # binds a free loopback port
    assert main(["serve", str(col), "--allow-host", "photos.lan", *workers]) == 0
    assert dict(os.environ) == environ
    worker = ran["workers_config"]
    assert worker.workers == 2 and worker.factory
    with TestClient(worker.app(), base_url="http://photos.lan") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400
        assert client.get("/api/search", params={"q": "x", "k": 7}).status_code == 200
        assert client.get("/api/search", params={"q": "x", "k": 8}).status_code == 400  # --max-k 7
        body = {"texts": ["a caption"]}
        for token, status in (("no", 401), ("s3cret", 200)):
            r = client.post("/api/index/add", json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == status, r.text


def test_a_slow_write_holds_up_no_read(tmp_path, monkeypatch):
    """While a write sits inside its transaction, searches, item lookups and /healthz answer at once, from the
    last committed state; the write's rows appear when it commits."""
    col, _ = build_collection(tmp_path, n=24, captions=False)
    in_write, release = threading.Event(), threading.Event()
    insert = db.insert_batch

    def slow_insert(*args, **kw):
        in_write.set()
        release.wait(15)
        return insert(*args, **kw)

    monkeypatch.setattr(db, "insert_batch", slow_insert)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    caption = "a turquoise hexagon"

    def captions(client) -> list:
        res = client.get("/api/search", params={"q": caption, "k": 50}).json()["results"]
        return [h["caption"] for h in res]

    with TestClient(create_app(make_config(col, tmp_path, token=TOKEN), encoder=ShapeEncoder())) as client:
        items = client.get("/healthz").json()["items"]
        added: dict = {}
        writer = threading.Thread(
            target=lambda: added.update(
                r=client.post("/api/index/add", json={"texts": [caption]}, headers=auth)
            )
        )
        writer.start()
        try:
            assert in_write.wait(10)
            for _ in range(3):
                for url in ("/healthz", "/api/info", "/api/items/1", f"/api/search?q={caption}"):
                    t0 = time.monotonic()
                    r = client.get(url)
                    assert r.status_code == 200 and time.monotonic() - t0 < 2.0, (url, r.text[:200])
                assert client.get("/healthz").json()["items"] == items
                assert caption not in captions(client)  # the previous committed state
        finally:
            release.set()
            writer.join(20)
        assert added["r"].status_code == 200, added["r"].text
        assert caption in captions(client)
        assert client.get("/healthz").json()["items"] == items + 1


# ---------------------------------------------------------------------------------------------- writes
@pytest.fixture
def writable(tmp_path) -> Iterator[tuple[TestClient, Path]]:
    """A service of its own for the tests that change the collection: `served` stays as built, so no test
    depends on which others ran before it."""
    col, _ = build_collection(tmp_path, n=24, captions=False)
    with TestClient(create_app(make_config(col, tmp_path, token=TOKEN), encoder=ShapeEncoder())) as client:
        yield client, col


def test_writes_need_the_token(writable):
    client, col = writable
    body = {"texts": ["a yellow circle, described"]}
    assert client.post("/api/index/add", json=body).status_code == 401
    r = client.post("/api/index/add", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Bearer" in error_of(r)
    assert client.delete("/api/index/1", headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    png = shape_png("yellow", "circle", seed=99)
    r = client.post("/api/index/add", json={**body, "images": [b64(png)]}, headers=auth)
    assert r.status_code == 200, r.text
    new_ids = r.json()["ids"]
    assert len(new_ids) == 2 and r.json()["added"] == 2
    assert list((col / "uploads").glob("*.png"))  # the upload is kept beside the collection
    found = client.post("/api/search", json={"like": new_ids[0], "k": 50}).json()["results"]
    assert new_ids[0] in [h["id"] for h in found]  # searchable at once
    r = client.delete(f"/api/index/{new_ids[0]}", headers=auth)
    assert r.status_code == 200 and r.json() == {"removed": 1}
    assert client.get(f"/api/items/{new_ids[0]}").status_code == 404
    assert client.delete(f"/api/index/{new_ids[0]}", headers=auth).status_code == 404
    for bad in ({}, {"images": [b64(b"not an image")]}, {"texts": [""]}, {"paths": "x"}):
        r = client.post("/api/index/add", json=bad, headers=auth)
        assert r.status_code in (400, 422), (bad, r.text)
        error_of(r)


def test_index_add_opens_only_files_on_the_server(writable, tmp_path):
    # The one reader streams URLs and runs `pipe:` commands as shards; a request's paths must never reach it.
    client, _ = writable
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ran = tmp_path / "ran"
    for path in (f"pipe:touch {ran}", "http://127.0.0.1:9/shard-{000..001}.tar"):
        r = client.post("/api/index/add", json={"paths": [path]}, headers=auth)
        assert r.status_code == 400 and "files on this server" in error_of(r), r.text
    assert not ran.exists()


def test_writes_are_disabled_without_a_token(tmp_path):
    col, _ = build_collection(tmp_path, n=24, captions=False)
    with TestClient(create_app(make_config(col, tmp_path), encoder=ShapeEncoder())) as client:
        for r in (
            client.post(
                "/api/index/add", json={"texts": ["x"]}, headers={"Authorization": "Bearer anything"}
            ),
            client.delete("/api/index/1"),
        ):
            assert r.status_code == 403 and "CLIPFORGE_TOKEN" in error_of(r)
        assert client.get("/healthz").json()["writes_enabled"] is False


# ------------------------------------------------------------------------------------- clip-retrieval
def test_clip_retrieval_endpoints(served):
    client, labels, tmp = served
    assert client.get("/indices-list").json() == ["col"]
    # Exactly the body clip-retrieval's ClipClient sends (json.dumps'd, no content type).
    body = {
        "text": "a blue square",
        "image": None,
        "image_url": None,
        "embedding_input": None,
        "deduplicate": True,
        "use_safety_model": True,
        "use_violence_detector": True,
        "indice_name": "col",
        "use_mclip": False,
        "aesthetic_score": 9,
        "aesthetic_weight": 0.5,
        "modality": "image",
        "num_images": 3,
        "num_result_ids": 3,
    }
    r = client.post("/knn-service", content=json.dumps(body))
    assert r.status_code == 200, r.text
    res = r.json()
    assert [labels[x["id"]] for x in res[:2]] == ["blue square", "blue square"]
    assert res[0]["url"].endswith(f"/api/images/{res[0]['id']}") and res[0]["similarity"] == pytest.approx(
        1.0, abs=1e-5
    )
    by_image = client.post(
        "/knn-service", content=json.dumps({**body, "text": None, "image": b64(shape_png("red", "cross"))})
    )
    assert labels[by_image.json()[0]["id"]] == "red cross"
    vec = ShapeEncoder().embed_texts(["green circle"])[0].tolist()
    by_vec = client.post("/knn-service", content=json.dumps({**body, "text": None, "embedding_input": vec}))
    assert labels[by_vec.json()[0]["id"]] == "green circle"
    texts = client.post(
        "/knn-service", content=json.dumps({**body, "text": "purple cross", "modality": "text"})
    )
    assert [x["caption"] for x in texts.json()][:1] == ["a purple cross, in words"]
    meta = client.post(
        "/metadata", content=json.dumps({"ids": [res[0]["id"], 10**6], "indice_name": "col"})
    ).json()
    assert meta == [{"id": res[0]["id"], "metadata": {"url": res[0]["url"]}}]
    for bad, status in (
        ({**body, "indice_name": "laion5B"}, 400),
        ({**body, "text": None, "image_url": "http://example.com/a.jpg"}, 400),
        ({**body, "text": None}, 400),
        ({**body, "num_images": 0}, 422),
        ({**body, "num_images": 5000, "num_result_ids": 5000}, 400),
    ):
        r = client.post("/knn-service", content=json.dumps(bad))
        assert r.status_code == status, (bad, r.text)
        error_of(r)
    assert client.post("/knn-service", content=b"nope").status_code == 400
    assert client.post("/metadata", content=b"{}").status_code == 422


def test_knn_service_fills_num_images_from_a_mixed_collection(tmp_path):
    """Captions that outrank every image must not crowd the images out of an image-modality answer (nor the
    images the captions out of a text-modality one): the modality is filtered before the top k are taken."""
    col, labels = build_collection(tmp_path, n=24, captions=False)
    enc = ShapeEncoder()
    with Collection.open(col) as c:
        caption_ids = c.add_texts([f"blue, take {i}" for i in range(8)], enc)  # cosine 1 to the query "blue"
    app = create_app(make_config(col, tmp_path), encoder=enc)
    with TestClient(app) as client:
        body = {"text": "blue", "modality": "image", "num_images": 5}
        res = client.post("/knn-service", content=json.dumps(body)).json()
        assert len(res) == 5 and all(labels[x["id"]].startswith("blue") for x in res[:3]), res
        assert all("caption" not in x and x["id"] not in caption_ids for x in res)
        by_image = {"image": b64(shape_png("blue", "square")), "modality": "text", "num_images": 6}
        res = client.post("/knn-service", content=json.dumps(by_image)).json()
        assert len(res) == 6 and all(x["id"] in caption_ids for x in res), res  # the 8 tie: any 6
        res = client.post("/knn-service", content=json.dumps({**body, "modality": "text", "num_images": 20}))
        assert len(res.json()) == 8  # every caption, and only captions
        r = client.post("/knn-service", content=json.dumps({**body, "modality": "video"}))
        assert r.status_code == 422


def _load_clip_client():
    """clip-retrieval's own client module, loaded from its file: the package's __init__ imports the whole
    back end (flask, torch, ...), which the client itself never uses."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    mod_spec = importlib.util.spec_from_file_location("clip_client_under_test", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_clip_retrieval_clip_client_unchanged(served, tmp_path):
    import os

    pytest.importorskip("requests")
    module = _load_clip_client()
    if module is None:
        if os.environ.get("CI"):
            pytest.fail("clip-retrieval must be installed in CI: pip install --no-deps clip-retrieval")
        pytest.skip("clip-retrieval is not installed (pip install --no-deps clip-retrieval)")
    client, labels, _ = served
    with running_server(client.app) as url:
        cc = module.ClipClient(url=f"{url}/knn-service", indice_name="col", num_images=4)
        res = cc.query(text="an orange triangle")
        assert [labels[x["id"]] for x in res[:2]] == ["orange triangle", "orange triangle"]
        assert {"id", "similarity", "url"} <= set(res[0])
        img = tmp_path / "q.png"
        img.write_bytes(shape_png("green", "cross"))
        assert labels[cc.query(image=str(img))[0]["id"]] == "green cross"
        vec = ShapeEncoder().embed_texts(["yellow square"])[0].tolist()
        assert labels[cc.query(embedding_input=vec)[0]["id"]] == "yellow square"


class ShortSightedShapeEncoder(ShapeEncoder):
    """Reads only a text's first 20 characters, unless asked to read long texts another way."""

    def __init__(self) -> None:
        super().__init__()
        self.longs: list[str] = []

    def embed_texts(self, texts: list[str], long: str = "truncate") -> np.ndarray:
        self.longs.append(long)
        return super().embed_texts([t[:20] if long == "truncate" else t for t in texts])


def test_long_field_chooses_how_long_texts_are_read(tmp_path):
    col, labels = build_collection(tmp_path)
    enc = ShortSightedShapeEncoder()
    text = "a plain picture showing a red circle"  # the colour and shape lie past the 20 characters
    with TestClient(create_app(make_config(col, tmp_path), encoder=enc)) as client:
        cut, whole = (
            client.post("/api/embed", json={"texts": [text], **long}).json()["texts"][0]
            for long in ({}, {"long": "chunk"})
        )
        assert cut != whole  # the same text, cached per strategy
        np.testing.assert_allclose(whole, ShapeEncoder().embed_texts([text])[0], atol=1e-6)
        hits = client.post(
            "/api/search", json={"text": text, "long": "interpolate", "k": 2, "mode": "vector"}
        ).json()["results"]
        assert [labels[h["id"]] for h in hits] == ["red circle", "red circle"]
        assert set(enc.longs) == {"truncate", "chunk", "interpolate"}
        r = client.post("/api/search", json={"text": text, "long": "summarise"})
        assert r.status_code == 422 and "truncate" in r.text


def test_query_only_service_holds_the_text_tower_alone(tmp_path):
    from conftest import save_tiny_model

    from clipforge.encoder import Encoder
    from clipforge.model.tower import AbsentTower

    model = save_tiny_model(tmp_path / "m")
    write_shapes(tmp_path / "shapes", 6, seed=1)
    full = Encoder.load(model)
    with Collection.create(tmp_path / "col", identity=full.identity, dim=full.dim) as c:
        c.add([tmp_path / "shapes" / "images"], full)
    app = create_app(make_config(tmp_path / "col", tmp_path, model=str(model), towers="text"))
    with TestClient(app) as client:
        enc = app.state.engine.encoder
        assert isinstance(
            enc.model.visual, AbsentTower
        )  # the fingerprint matched before the image tower went
        assert not any(k.startswith("visual.") for k in enc.model.state_dict())
        r = client.post("/api/embed", json={"texts": ["a red circle"]})
        np.testing.assert_allclose(r.json()["texts"], full.embed_texts(["a red circle"]), atol=1e-6)
        assert len(client.get("/api/search", params={"q": "a red circle", "k": 3}).json()["results"]) == 3
        r = client.post("/api/search", files={"image": ("a.png", shape_png("red", "circle"), "image/png")})
        assert r.status_code == 400 and "text tower only" in error_of(r)


def test_search_modes_relevance_and_captions_only(served):
    client, labels, _ = served
    # Keyword mode matches caption words exactly (no model involved); every hit carries its relevance.
    kw = client.post("/api/search", json={"text": "notes green", "mode": "keyword", "k": 5}).json()["results"]
    assert kw[0]["caption"] == "notes about a green square" and kw[0]["relevance"] > 0.5
    # Image-to-text on captions only: captions and nothing else, whatever k (other tests may add captions).
    png = shape_png("purple", "cross")
    caps = client.post("/api/search", json={"image": b64(png), "modality": "text", "k": 10}).json()["results"]
    assert {"a purple cross, in words", "notes about a green square"} <= {h["caption"] for h in caps}
    assert all(h["caption"] and h["image_url"] is None for h in caps) and len(caps) < 10
    # A cut-off of 1.0 leaves only hits with no estimate or a perfect one; named errors for bad options.
    strict = client.get("/api/search", params={"q": "green", "k": 10, "min_relevance": 1.0}).json()["results"]
    assert all(h["relevance"] is None or h["relevance"] >= 1.0 for h in strict)
    bad = client.post("/api/search", json={"text": "x", "after": "someday"})
    assert bad.status_code == 400 and "neither a date" in bad.text
    assert client.post("/api/search", json={"like": 1, "mode": "keyword"}).status_code == 400
