"""Image loading and CLIP preprocessing: parity with Hugging Face's CLIPImageProcessor, every mode a user's
file can have, every way a file can be bad, the fast JPEG path and the seeded train transform."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require
from memlimit import GB, address_space_cap
from PIL import Image, ImageDraw, ImageFile

from clipforge.model.config import PreprocessConfig
from clipforge.transforms import (
    MAX_PIXELS,
    ImageError,
    Preprocess,
    TrainTransform,
    from_hf_preprocessor_config,
    load_image,
    to_hf_preprocessor_config,
)

# Measured max abs difference against CLIPImageProcessor (PIL backend) was 0.0: both resize with Pillow on
# uint8 and crop at the same offset, so the tensors are bit-identical on transformers 5.23 / Pillow 13.
# The slack allows float32 op-order differences between versions (x * (1/255) vs x / 255, float64 rescale
# in older transformers), which move a normalised value by a few ulps.
HF_TOL = 1e-5

# Draft (DCT-scaled) JPEG decoding vs a full decode, both then resized to 224: measured max abs 0.16-0.22
# (in normalised units, at the edges of a saturated shape), mean abs ~0.007, cosine 0.99991.
DRAFT_MAX_TOL = 0.35
DRAFT_MEAN_TOL = 0.02
DRAFT_MIN_COS = 0.999


def natural(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients + noise + a saturated disc: something like a photo, with edges and texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), (x + y) * 255 / (w + h)], -1)
    a = np.clip(a + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a)
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 2, h // 2), fill=(250, 30, 30))
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ HF parity


def _hf_processor(d: dict):
    transformers = require("transformers")
    # transformers 5 split CLIPImageProcessor into a torchvision backend (torchvision is not installed
    # here) and a PIL backend; 4.x has only the PIL-based CLIPImageProcessor.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**d)


PARITY_CONFIGS = [
    PreprocessConfig(),
    PreprocessConfig(image_size=64, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    PreprocessConfig(image_size=48, interpolation="nearest"),
    PreprocessConfig(image_size=96, resize_mode="squash"),
]
# landscape, portrait, small (upscaled), odd sizes with an odd crop offset, square, near-square, extreme
PARITY_SIZES = [(640, 480), (480, 640), (100, 75), (333, 517), (225, 1001), (224, 224), (301, 300), (17, 9)]


@pytest.mark.parametrize(
    "cfg", PARITY_CONFIGS, ids=lambda c: f"{c.image_size}-{c.interpolation}-{c.resize_mode}"
)
def test_matches_hf_clip_image_processor(cfg: PreprocessConfig) -> None:
    hf = _hf_processor(to_hf_preprocessor_config(cfg))
    pre = Preprocess(cfg)
    for i, (w, h) in enumerate(PARITY_SIZES):
        img = natural(w, h, seed=i)
        ref = torch.from_numpy(np.asarray(hf(img, return_tensors="np")["pixel_values"][0]))
        out = pre(img)
        assert out.shape == ref.shape == (3, cfg.image_size, cfg.image_size)
        assert out.dtype == torch.float32
        assert (out - ref).abs().max().item() <= HF_TOL, (w, h)


def test_normalisation_of_a_solid_colour() -> None:
    cfg = PreprocessConfig(image_size=32)
    out = Preprocess(cfg)(Image.new("RGB", (50, 40), (10, 128, 250)))
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-6, rtol=0)


def test_batch_and_sources_agree(tmp_path: Path) -> None:
    pre = Preprocess(PreprocessConfig(image_size=32))
    img = natural(80, 60)
    path = tmp_path / "a.png"
    img.save(path)
    data = encode(img, "PNG")
    batch = pre.batch([img, path, str(path), data, io.BytesIO(data)])
    assert batch.shape == (5, 3, 32, 32)
    for t in batch[1:]:
        assert torch.equal(t, batch[0])
    with pytest.raises(ValueError):
        pre.batch([])


def test_hf_config_round_trip_and_old_format() -> None:
    for cfg in PARITY_CONFIGS:
        assert from_hf_preprocessor_config(to_hf_preprocessor_config(cfg)) == cfg
    old = {"size": 336, "crop_size": 336, "do_center_crop": True, "resample": 3, "image_mean": [0.1] * 3}
    old["image_std"] = [0.2] * 3
    cfg = from_hf_preprocessor_config(old)
    assert (cfg.image_size, cfg.resize_mode, cfg.mean, cfg.interpolation) == (
        336,
        "shortest",
        (0.1,) * 3,
        "bicubic",
    )
    d = to_hf_preprocessor_config(PreprocessConfig())
    assert d["size"] == {"shortest_edge": 224} and d["crop_size"] == {"height": 224, "width": 224}
    assert d["resample"] == 3 and d["rescale_factor"] == pytest.approx(1 / 255)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}, "centre crop"),
        ({"resample": 1}, "resample"),
        ({"size": {"height": 224, "width": 200}}, "square"),
        ({"size": {"longest_edge": 224}}, "size"),
    ],
)
def test_hf_config_we_cannot_reproduce_is_refused(change: dict, match: str) -> None:
    d = {**to_hf_preprocessor_config(PreprocessConfig()), **change}
    with pytest.raises(ValueError, match=match):
        from_hf_preprocessor_config(d)


# --------------------------------------------------------------------------------------------- modes


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_rgba_is_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(0, 0, 0, 0), (10, 20, 30, 255), (255, 0, 0, 128)])
    out = load_image(encode(img, "PNG"))
    assert pixel(out, (0, 0)) == (255, 255, 255)  # fully transparent black -> white, not black
    assert pixel(out, (1, 0)) == (10, 20, 30)
    r, g, b = pixel(out, (2, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1  # half red over white


def test_palette_with_and_without_transparency() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.putdata([0, 1])
    assert pixel(load_image(encode(img, "PNG")), (1, 0)) == (0, 200, 0)
    assert pixel(load_image(encode(img, "PNG")), (0, 0)) == (0, 0, 0)
    transparent = load_image(encode(img, "PNG", transparency=0))
    assert pixel(transparent, (0, 0)) == (255, 255, 255)
    assert pixel(transparent, (1, 0)) == (0, 200, 0)


def test_grayscale_and_gray_alpha() -> None:
    assert pixel(load_image(Image.new("L", (2, 2), 77))) == (77, 77, 77)
    la = Image.new("LA", (2, 2), (30, 0))
    assert pixel(load_image(encode(la, "PNG"))) == (255, 255, 255)
    assert pixel(load_image(Image.new("1", (2, 2), 1))) == (255, 255, 255)


def test_16_bit_is_scaled_not_clipped() -> None:
    a = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = load_image(encode(img, "PNG"))
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 128, 255, 4]  # v / 257, rounded
    as_int = load_image(Image.fromarray(a.astype(np.int32)))  # mode I holding 16-bit data
    assert [pixel(as_int, (x, 0))[0] for x in range(4)] == [0, 128, 255, 4]
    wide = load_image(Image.fromarray(np.array([[-50, 0, 205]], dtype=np.int32)))  # not 16-bit: stretch
    assert [pixel(wide, (x, 0))[0] for x in range(3)] == [0, 50, 255]


def test_float_images() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert unit.mode == "F"
    out = load_image(encode(unit, "TIFF"))
    assert [pixel(out, (x, 0))[0] for x in range(4)] == [0, 128, 255, 0]
    big = load_image(Image.fromarray(np.array([[-1.0, 3.0]], dtype=np.float32)))
    assert [pixel(big, (x, 0))[0] for x in range(2)] == [0, 255]


def test_cmyk() -> None:
    img = Image.new("CMYK", (2, 1))
    img.putdata([(0, 0, 0, 0), (0, 255, 255, 0)])
    out = load_image(encode(img, "TIFF"))
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 0)) == (255, 0, 0)


def test_exif_orientation_6_rotates_clockwise() -> None:
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(encode(img, "PNG", exif=exif.tobytes()))
    assert out.size == (32, 64)
    assert pixel(out, (16, 5)) == (255, 0, 0)  # the left edge is now the top
    assert pixel(out, (16, 58)) == (0, 0, 255)
    assert load_image(out).size == (32, 64)  # orientation tag was cleared: no second rotation


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert pixel(load_image(data), (4, 4)) == (255, 0, 0)


# ----------------------------------------------------------------------------------------- bad input


def assert_image_error(src, label: str, match: str, **kw) -> None:
    with pytest.raises(ImageError, match=match) as info:
        load_image(src, **kw)
    assert label in str(info.value)


def test_missing_empty_directory_and_text(tmp_path: Path) -> None:
    assert_image_error(tmp_path / "nope.jpg", "nope.jpg", "cannot open")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_image_error(tmp_path / "empty.png", "empty.png", "empty")
    assert_image_error(tmp_path, str(tmp_path), "directory")
    (tmp_path / "notes.txt").write_text("not an image at all\n")
    assert_image_error(tmp_path / "notes.txt", "notes.txt", "not a recognised image")
    assert_image_error(b"", "<bytes>", "empty")
    assert_image_error(b"GIF89a garbage", "upload-7", "not a recognised", name="upload-7")
    assert_image_error(io.BytesIO(b""), "<stream>", "empty")
    with pytest.raises(ImageError, match="notes.txt"):
        Preprocess(PreprocessConfig(image_size=32))(tmp_path / "notes.txt")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_raises(tmp_path: Path, fmt: str) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nobody (we included) turned partial loads on
    data = encode(natural(300, 200), fmt)
    path = tmp_path / f"half.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert_image_error(path, "half.", "truncated")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height: signature, IHDR, and an IDAT holding a few bytes of a deflate stream
    (Pillow's header parser stops at the first IDAT), nowhere near enough pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1000))[:8]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)


def test_decompression_bomb_is_caught_from_the_header() -> None:
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    # Over twice Pillow's limit (Pillow raises in open) and between its limit and twice it (Pillow warns).
    assert_image_error(png_header_only(50_000, 50_000), "<bytes>", "pixels")
    assert_image_error(png_header_only(10_000, 10_000), "<bytes>", "pixels")
    # Our own limit, checked before decoding: the file has no pixel data, so a decode would have failed
    # with "truncated" instead of this message.
    assert_image_error(
        png_header_only(5000, 4000), "big.png", "max_pixels", max_pixels=1_000_000, name="big.png"
    )
    assert_image_error(png_header_only(5000, 4000), "big.png", "decode", max_pixels=None, name="big.png")
    assert load_image(encode(natural(40, 30), "PNG"), max_pixels=1200).size == (40, 30)
    assert_image_error(natural(40, 30), "<image>", "max_pixels", max_pixels=1199)


def strip_png(width: int, height: int) -> bytes:
    """A real, complete gray PNG of width x height: a few hundred bytes however long the strip."""
    return encode(Image.new("L", (width, height), 128), "PNG")


def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path: Path) -> None:
    # Header-only files: without the check from the header these fail later, as "truncated".
    assert_image_error(png_header_only(200_000, 1), "strip.png", "200000x1 .*200000:1", name="strip.png")
    assert_image_error(png_header_only(1, 30_000), "<bytes>", "1x30000 .*max_aspect")
    assert_image_error(Image.new("RGB", (1000, 2)), "<image>", "1000x2 .*500:1")
    path = tmp_path / "tall.png"
    path.write_bytes(strip_png(3, 3000))
    assert_image_error(path, "tall.png", "3x3000 .*1000:1")
    assert load_image(strip_png(400, 2)).size == (400, 2)  # exactly 200:1 is allowed
    assert load_image(strip_png(3, 3000), max_aspect=None).size == (3, 3000)
    assert_image_error(strip_png(40, 2), "<bytes>", "20:1, .*10:1", max_aspect=10)


@pytest.mark.parametrize("size", [(200_000, 1), (1, 200_000), (2_000_000, 1)])
def test_preprocess_of_a_strip_is_a_named_error_in_bounded_memory(tmp_path: Path, size) -> None:
    # Resizing the short side of 200000x1 to 224 first asked Pillow for 224 x 44.8M pixels (40 GB): under
    # the cap that was a MemoryError, unbounded an OOM kill. Now the header check refuses it.
    path = tmp_path / "strip.png"
    path.write_bytes(strip_png(*size))
    assert path.stat().st_size < 3000
    pre = Preprocess(PreprocessConfig())
    with address_space_cap(2 * GB):
        with pytest.raises(ImageError, match=f"strip.png: {size[0]}x{size[1]} .*max_aspect"):
            pre(path)
        with pytest.raises(ImageError, match=f"<image>: {size[0]}x{size[1]} .*max_aspect"):
            pre(load_image(path, max_aspect=None))  # an image decoded without the limit is still refused


def test_the_widest_allowed_image_preprocesses_in_bounded_memory() -> None:
    # Exactly 200:1, just under the service's 40 Mpx limit: 89400x447, decoded (160 MB as RGB) and resized
    # to 44800x224 before the crop.
    data = strip_png(89_400, 447)
    pre = Preprocess(PreprocessConfig())
    with address_space_cap(2 * GB):
        out = pre(data)
    assert out.shape == (3, 224, 224)
    cfg = pre.config
    torch.testing.assert_close(out[0], torch.full((224, 224), (128 / 255 - cfg.mean[0]) / cfg.std[0]))


# ------------------------------------------------------------------------------------- fast JPEG path


def test_draft_decodes_smaller_and_barely_moves_the_tensor() -> None:
    data = encode(natural(1600, 1200), "JPEG", quality=90)
    # min(1600 // 224, 1200 // 224) = 5 -> scale 1/4; both sides stay >= 224
    assert load_image(data, draft_size=224).size == (400, 300)
    assert load_image(data).size == (1600, 1200)
    assert load_image(encode(natural(1600, 1200), "PNG"), draft_size=224).size == (1600, 1200)  # JPEG only
    full = Preprocess(PreprocessConfig())(data)
    fast = Preprocess(PreprocessConfig(fast_jpeg=True))(data)
    diff = (full - fast).abs()
    assert 0 < diff.max().item() <= DRAFT_MAX_TOL
    assert diff.mean().item() <= DRAFT_MEAN_TOL
    assert (
        torch.nn.functional.cosine_similarity(full.flatten(), fast.flatten(), dim=0).item() >= DRAFT_MIN_COS
    )


def test_a_decoded_frame_is_returned_without_a_copy(tmp_path: Path, monkeypatch) -> None:
    """Bulk decoding keeps one image per file in memory, not two: a decoded frame comes back as it is, still
    usable once its file is closed."""
    natural(64, 48).save(tmp_path / "a.png")
    copies: list[tuple[int, int]] = []
    real = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(self.size) or real(self))
    for src in (tmp_path / "a.png", encode(natural(64, 48), "JPEG"), encode(natural(64, 48), "PNG")):
        out = load_image(src)
        assert np.asarray(out.resize((8, 6))).shape == (6, 8, 3)
    assert copies == []


# ------------------------------------------------------------------------------------- train transform


def test_train_transform_is_seeded() -> None:
    tt = TrainTransform(PreprocessConfig(image_size=32))
    img = natural(120, 90)
    a = tt(img, torch.Generator().manual_seed(3))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, tt(img, torch.Generator().manual_seed(3)))
    assert torch.equal(a, tt(img, 3))
    assert not torch.equal(a, tt(img, 4))


def test_train_crop_boxes_respect_scale_and_ratio() -> None:
    tt = TrainTransform(PreprocessConfig(image_size=32), scale=(0.5, 0.8))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = tt.crop_box((400, 300), g)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        assert 0.49 <= w * h / 120_000 <= 0.81
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert tt.crop_box((1000, 10), g) == (493, 0, 13, 10)  # nothing fits: central crop at ratio 4/3


def test_full_crop_equals_squash_resize() -> None:
    # scale = ratio = 1 on a square image: the crop is the whole image, so the output is Preprocess's squash.
    cfg = PreprocessConfig(image_size=32)
    img = natural(90, 90)
    out = TrainTransform(cfg, scale=(1.0, 1.0), ratio=(1.0, 1.0))(img, 0)
    ref = Preprocess(PreprocessConfig(image_size=32, resize_mode="squash"))(img)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
