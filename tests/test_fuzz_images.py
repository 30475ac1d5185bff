"""Fuzz the image decoders and `index add` with Hypothesis. Whatever the bytes, the image or the manifest, the
answer is correct or a named error of clipforge (ImageError, SourceError, ManifestError, ...): never another
exception, never more than a bounded amount of memory, never a file written outside the collection folder.

Bounded: 40 to 150 examples per test, the whole file in about ten seconds; derandomised (the same examples on every run, as CI wants), no
example database (it would be a file written outside the collection)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from memlimit import GB, address_space_cap
from PIL import Image

from clipforge.encoder import Encoder
from clipforge.index import Collection
from clipforge.index.bulk import add_sources
from clipforge.index.embed import decode_item
from clipforge.index.sources import Item
from clipforge.model.config import PreprocessConfig
from clipforge.transforms import MAX_ASPECT, ImageError, Preprocess, load_image

# Pillow warns (and then raises, which is what is checked) on the corrupt TIFFs this file makes.
pytestmark = pytest.mark.filterwarnings("ignore:(Corrupt EXIF data|Truncated File Read):UserWarning")
FUZZ = settings(
    max_examples=40,  # an `index add` example costs ~0.1 s
    deadline=None,  # a shared CI core can stall any one example; the whole file stays well under 40 s
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PRE = {m: Preprocess(PreprocessConfig(image_size=32, resize_mode=m)) for m in ("shortest", "squash")}

# Which modes each format can store (Pillow converts or refuses the others).
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
}


def make_image(w: int, h: int, mode: str, seed: int) -> Image.Image:
    """Noise in `mode`; a large image is one flat colour, so that its file stays a few KB."""
    if w * h > 1024:
        return Image.new("RGBA", (w, h), (seed * 20, 90, 200, 255)).convert(mode)
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(0, 3, (h, w)).astype(np.float32))
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)


@st.composite
def encoded_images(draw) -> tuple[bytes, tuple[int, int], str]:
    """(file bytes, (w, h), how it was damaged: "" for an intact file) of an image in some format and mode:
    odd sizes, strips far past MAX_ASPECT, truncations and flipped bytes, each file a few KB at most."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    event(f"{fmt} {mode}")
    short = draw(st.integers(1, 12))
    strips = st.integers(3000, 200_000) if fmt == "PNG" else st.nothing()  # PNG has no size cap
    long = draw(st.one_of(st.integers(1, 40), st.integers(150, 3000), strips))
    w, h = (long, short) if draw(st.booleans()) else (short, long)
    buf = io.BytesIO()
    options = {"compression": "tiff_deflate"} if fmt == "TIFF" else {}
    make_image(w, h, mode, draw(st.integers(0, 9))).save(buf, fmt, **options)
    data = buf.getvalue()
    assert len(data) < 150_000  # PNG strips: a few KB; BMP cannot compress
    damage = draw(st.sampled_from(["", "", "truncated", "flipped"]))
    if damage == "truncated":
        data = data[: draw(st.integers(1, len(data) - 1))]
    elif damage == "flipped":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        data = bytes(b)
    return data, (w, h), damage


def check_decoders(data: bytes, folder: Path) -> tuple[Image.Image | None, str | None]:
    """Run every decoder on `data` (bytes and file; load_image, Preprocess in both modes, the bulk decoder)
    and check they agree; returns (image, None) or (None, ImageError message)."""
    path = folder / "input.bin"
    path.write_bytes(data)
    try:
        img = load_image(data)
    except ImageError as e:
        with pytest.raises(ImageError) as from_file:
            PRE["shortest"](path)
        x, status, *_ = decode_item(Item(str(path), str(path)), PRE["shortest"])
        assert x is None and status == str(from_file.value).removeprefix(f"{path}: "), status
        return None, str(e)
    assert img.mode == "RGB" and img.size == load_image(path).size
    for pre in PRE.values():
        t = pre(img)
        assert t.shape == (3, 32, 32) and torch.isfinite(t).all()
    x, status, *_ = decode_item(Item(str(path), str(path)), PRE["shortest"])
    assert status is None and torch.equal(x, PRE["shortest"](data))
    return img, None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=150)  # a few ms each
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(scratch, data):
    with address_space_cap(2 * GB):
        check_decoders(data, scratch)


@settings(FUZZ, max_examples=150)
@given(encoded_images())
def test_generated_images(scratch, case):
    data, (w, h), damage = case
    with address_space_cap(2 * GB):
        img, error = check_decoders(data, scratch)
    event(f"{damage or 'intact'}: {'error' if error else 'decoded'}")
    if max(w, h) > MAX_ASPECT * min(w, h) and not damage:
        assert error is not None and f"{w}x{h} has an aspect ratio" in error
    elif not damage:
        assert error is None and img.size == (w, h)  # an intact file within the limits decodes, at its size


# ------------------------------------------------------------------------------------------ index add

NAMES = [
    "img/ok.png",
    "img/ok.jpg",
    "img/strip.png",
    "img/half.png",
    "img/notes.txt",
    "img",
    "img/missing.png",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
image_refs = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(NAMES).map(lambda n: "./" + n.replace("/", "/../img/", 1) if "/" in n else n),
    st.text(max_size=12),
)
good_lines = st.fixed_dictionaries(
    {"image": image_refs},
    optional={"caption": json_values, "captions": json_values, "source": json_values, "key": json_values},
).map(json.dumps)
bad_lines = st.one_of(json_values.map(json.dumps), st.text(max_size=30))
csv_headers = st.sampled_from(
    [["image", "caption"], ["path", "caption"], ["caption", "image", "key"], ["image", "caption"], ["x", "y"]]
)


@st.composite
def manifests(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        lines = draw(st.lists(good_lines, min_size=1, max_size=6))
        if draw(st.integers(0, 2)) == 0:  # most manifests are well formed, so they reach the collection
            lines.insert(draw(st.integers(0, len(lines))), draw(bad_lines))
        return ".jsonl", "\n".join(lines).encode()
    header = draw(csv_headers)
    cell = st.one_of(image_refs, st.text(max_size=10))
    width = st.sampled_from([len(header)] * 4 + [len(header) + 1])
    rows = draw(st.lists(width.flatmap(lambda n: st.lists(cell, min_size=n, max_size=n)), max_size=5))
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    text = buf.getvalue().encode()
    return ".csv", text if draw(st.integers(0, 4)) else text + draw(st.binary(max_size=8))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and a pool of input files that every example's manifest names."""
    root = tmp_path_factory.mktemp("add-fuzz")
    enc = Encoder.load(save_tiny_model(root / "model"))
    img = root / "inputs" / "img"
    img.mkdir(parents=True)
    make_image(20, 14, "RGB", 0).save(img / "ok.png")
    make_image(9, 30, "RGB", 1).save(img / "ok.jpg")
    Image.new("L", (100_000, 1)).save(img / "strip.png")
    data = (img / "ok.png").read_bytes()
    (img / "half.png").write_bytes(data[: len(data) // 2])
    (img / "notes.txt").write_text("not an image")
    return root, enc, itertools.count()


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def is_named(e: BaseException) -> bool:
    return type(e).__module__.startswith("clipforge.")  # SourceError, ManifestError, WriteError, ...


@FUZZ
@given(manifests())
@example((".jsonl", b'{"image": "img/ok.png", "n": 1180591620717411303424}'))  # found: past int64
def test_manifest_lines_into_index_add(world, manifest):
    root, enc, counter = world
    suffix, content = manifest
    inputs = root / "inputs"
    m = inputs / f"m{next(counter)}{suffix}"
    m.write_bytes(content)
    col = root / f"col{next(counter)}"
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    before = files_under(root) | files_under(tmp)
    old_tempdir, tempfile.tempdir = tempfile.tempdir, str(tmp)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with address_space_cap(2 * GB), Collection.create(col, identity=enc.identity, dim=enc.dim) as c:
            try:
                report = add_sources(c, [m], enc, batch_size=4, workers=0)
            except Exception as e:  # noqa: BLE001 - the assertion is about its type
                assert is_named(e), f"{type(e).__module__}.{type(e).__name__}: {e}"
                report = None
                event(type(e).__name__)
            rows = c.info()["rows"]
            assert rows == len(c)
    finally:
        os.chdir(cwd)
        tempfile.tempdir = old_tempdir
    written = {p for p in files_under(root) | files_under(tmp) if col not in p.parents and p != col}
    assert written - before == set(), sorted(written - before)  # nothing outside the collection
    assert not (col / "scratch").exists() or not any((col / "scratch").iterdir())
    assert not [p for p in files_under(col) if p.name.endswith(".tmp")]
    if report is not None:
        event(f"added {len(report.added)}, failed {len(report.failed)}")
        good = {str(inputs / "img" / "ok.png"), str(inputs / "img" / "ok.jpg")}
        assert set(report.added) <= good and rows == len(report.added)
        assert all(reason for _, reason in report.failed)
