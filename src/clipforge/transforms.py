"""Image decoding and CLIP preprocessing on Pillow + numpy + torch (no torchvision).

`load_image` turns whatever a user has (a path, bytes, a stream, a PIL image in any mode) into an RGB PIL
image or raises `ImageError` naming the file. Besides Pillow's formats it reads HEIC/HEIF and camera RAW
(`clipforge.media`) when the `[media]` extra is installed. It checks the pixel count and the aspect ratio from the header
before decoding, which bounds the memory of the decode and of the resize after it. `Preprocess` is the eval
transform (resize the shorter side, centre-crop, normalise) and matches Hugging Face's `CLIPImageProcessor`;
`TrainTransform` is the random resized crop used for training. Both read a `PreprocessConfig`, which a
checkpoint carries.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from clipforge.media.formats import register_plugins
from clipforge.media.raw import decode_raw, is_raw
from clipforge.model.config import PreprocessConfig

# Pillow's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS): ~0.25 GiB of 24-bit pixels.
MAX_PIXELS: int = 89_478_485
# Longest side / shortest side. Resizing the short side to S makes the long side S * ratio, so without a limit
# a 274-byte 200000x1 PNG asks the resize for 224 x 44.8M pixels (40 GB). At 200:1 the resized image is at
# most 200 S^2 pixels (40 MB at S = 224) and the centre crop still sees 0.5% of the picture; beyond that the
# crop is a sliver, so such an image is refused rather than embedded.
MAX_ASPECT: float = 200.0

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# Hugging Face stores the resampling filter as PIL's integer code.
_HF_RESAMPLE = {3: "bicubic", 2: "bilinear", 0: "nearest"}
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image


class ImageError(ValueError):
    """An image that cannot be used: missing, empty, not an image, truncated, too large, or a directory."""


# ---------------------------------------------------------------------------------------------- loading


def load_image(
    src: ImageSource,
    *,
    max_pixels: int | None = MAX_PIXELS,
    draft_size: int | None = None,
    name: str | None = None,
    max_aspect: float | None = MAX_ASPECT,
) -> Image.Image:
    """Decode `src` into a fully loaded RGB image: EXIF orientation applied, transparency composited on
    white, the first frame of an animation, 16-bit and float data scaled to 8 bits.

    `max_pixels` bounds width * height, checked from the header before any pixel is decoded (None: no
    limit of ours; Pillow's global `Image.MAX_IMAGE_PIXELS` still refuses images over twice its value).
    `max_aspect` bounds longest side / shortest side, also from the header (None: no limit).
    `draft_size` lets a JPEG file decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size
    (not applied to an already opened PIL image, which belongs to the caller).
    """
    if isinstance(src, Image.Image):
        label = name or getattr(src, "filename", None) or "<image>"
        with _errors(label):
            check_size(src.size, max_pixels, max_aspect, label)
            src.load()
            return _finish(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(src) == 0:
            raise ImageError(f"{label}: empty input (0 bytes)")
        return _decode(io.BytesIO(src), label, max_pixels, max_aspect, draft_size)
    if isinstance(src, (str, os.PathLike)):
        return _load_path(os.fspath(src), name, max_pixels, max_aspect, draft_size)
    if hasattr(src, "read"):
        label = name or str(getattr(src, "name", "<stream>"))
        if _stream_is_empty(src):
            raise ImageError(f"{label}: empty input (0 bytes)")
        return _decode(src, label, max_pixels, max_aspect, draft_size)
    raise ImageError(f"{name or '<input>'}: cannot load an image from a {type(src).__name__}")


def _load_path(
    path: str, name: str | None, max_pixels: int | None, max_aspect: float | None, draft_size: int | None
) -> Image.Image:
    label = name or path
    if os.path.isdir(path):
        raise ImageError(f"{label}: is a directory, not an image file")
    try:
        f = open(path, "rb")  # closed below; Pillow only borrows it, so the caller never holds a handle
    except OSError as e:
        raise ImageError(f"{label}: cannot open ({e.strerror or e})") from e
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ImageError(f"{label}: empty file (0 bytes)")
        return _decode(f, label, max_pixels, max_aspect, draft_size)


def _stream_is_empty(f: Any) -> bool:
    if not (hasattr(f, "seekable") and f.seekable()):
        return False
    pos = f.tell()
    empty = f.read(1) in (b"", None)
    f.seek(pos)
    return empty


def _decode(
    fp: BinaryIO, label: str, max_pixels: int | None, max_aspect: float | None, draft_size: int | None
) -> Image.Image:
    register_plugins()  # HEIC/HEIF, when pillow-heif is installed
    with _errors(label):
        if is_raw(fp, label):
            # Camera RAW goes to rawpy; what it does not recognise after all falls through to Pillow.
            raw = decode_raw(fp, lambda size: check_size(size, max_pixels, max_aspect, label))
            if raw is not None:
                return _to_rgb(raw)
        with warnings.catch_warnings():
            # Pillow warns (not raises) between its limit and twice it. When our limit is at least as
            # strict, that warning means "too large" anyway, so it becomes an error; when the caller
            # allowed more, it is noise. (catch_warnings swaps process-wide filters; it is brief.)
            strict = max_pixels is not None and max_pixels <= (Image.MAX_IMAGE_PIXELS or math.inf)
            warnings.simplefilter("error" if strict else "ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
        check_size(img.size, max_pixels, max_aspect, label)  # from the header: nothing decoded yet
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        # Decode inside the try: a truncated file fails here, not later in some transform. We never set
        # ImageFile.LOAD_TRUNCATED_IMAGES, so Pillow raises instead of padding the missing rows.
        img.load()
        out = _finish(img)
        # Detach from the (soon closed) file: the caller gets a plain in-memory image. A single frame is
        # detached already (Pillow drops `fp` once it is decoded); copying it too would double the peak
        # memory of every upright RGB image, the common case of bulk decoding. Animations keep `fp`.
        return img.copy() if out is img and getattr(img, "fp", None) is not None else out


@contextlib.contextmanager
def _errors(label: str) -> Iterator[None]:
    """Turn whatever Pillow raises on bad data into an ImageError that names the file."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{label}: too many pixels ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{label}: not a recognised image file") from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ... on corrupt data
        raise ImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e


def check_size(size: tuple[int, int], max_pixels: int | None, max_aspect: float | None, label: str) -> None:
    """The pixel and aspect guards every decoder applies to a (W, H) before decoding: ImageError if over."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{label}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (max_pixels)")
    if w <= 0 or h <= 0:
        raise ImageError(f"{label}: image has no pixels ({w}x{h})")
    if max_aspect is not None and max(w, h) > max_aspect * min(w, h):
        raise ImageError(
            f"{label}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.0f}:1, over the limit of "
            f"{max_aspect:g}:1 (max_aspect); its centre crop would be a sliver of the picture"
        )


def _finish(img: Image.Image) -> Image.Image:
    """EXIF orientation, then RGB. Returns `img` itself when it already is upright RGB."""
    if img.getexif().get(_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        return _gray_to_rgb(_scale_int(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(_scale_float(np.asarray(img, dtype=np.float32)))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _on_white(img.convert("RGBA"))
    return img.convert("RGB")  # L, P, 1, CMYK, YCbCr, ...


def _on_white(rgba: Image.Image) -> Image.Image:
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _scale_int(a: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int) gray -> uint8. 16-bit data maps 65535 -> 255 (divide by 257, not clip);
    values outside [0, 65535] cannot be 16-bit, so their own range is stretched to [0, 255]."""
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 65535:
        return np.rint(a / 257.0).astype(np.uint8)
    return _stretch(a, lo, hi)


def _scale_float(a: np.ndarray) -> np.ndarray:
    """Float gray -> uint8: [0, 1] data is scaled by 255, [0, 255] data kept, anything else stretched."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    return _stretch(a, lo, hi)


def _stretch(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray), mode="L").convert("RGB")


# ------------------------------------------------------------------------------------------- transforms


def _normalise(img: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB image (H, W) -> float tensor (3, H, W): [0, 1], then (x - mean) / std per channel."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3) uint8
    x = x.permute(2, 0, 1).to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std)


class _Base:
    def __init__(self, cfg: PreprocessConfig) -> None:
        self.config = cfg
        self._resample = _RESAMPLE[cfg.interpolation]
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def _rgb(self, image: ImageSource) -> Image.Image:
        # A PIL image goes through load_image too (a no-op for upright RGB), so a file and the same file
        # opened by the caller give the same tensor.
        draft = self.config.image_size if self.config.fast_jpeg else None
        return load_image(image, draft_size=draft)


class Preprocess(_Base):
    """Eval transform: image -> FloatTensor (3, S, S). Shorter side resized to S (Hugging Face's
    int(S * long / short) for the longer side), centre crop with the offset rounded down, then normalise;
    `resize_mode="squash"` resizes straight to (S, S). Every input goes through `load_image` with its default
    limits, so the resized image is at most MAX_ASPECT * S^2 pixels whatever the caller passed in."""

    def __call__(self, image: ImageSource) -> torch.Tensor:
        img = self._rgb(image)
        s = self.config.image_size
        if self.config.resize_mode == "squash":
            return _normalise(img.resize((s, s), self._resample), self._mean, self._std)
        w, h = img.size
        if w <= h:
            size = (s, int(s * h / w))
        else:
            size = (int(s * w / h), s)
        if size != img.size:
            img = img.resize(size, self._resample)
        left, top = (size[0] - s) // 2, (size[1] - s) // 2
        return _normalise(img.crop((left, top, left + s, top + s)), self._mean, self._std)

    def batch(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """(N, 3, S, S) from N images."""
        if len(images) == 0:
            raise ValueError("Preprocess.batch needs at least one image")
        return torch.stack([self(im) for im in images])


class TrainTransform(_Base):
    """Random resized crop (area fraction in `scale`, aspect ratio log-uniform in `ratio`), resized to
    (S, S), then the same normalisation as `Preprocess`. Deterministic given a generator or integer seed;
    with neither it draws from torch's global RNG (which DataLoader seeds per worker)."""

    def __init__(
        self,
        cfg: PreprocessConfig,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__(cfg)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale = scale
        self.ratio = ratio

    def __call__(self, image: ImageSource, generator: torch.Generator | int | None = None) -> torch.Tensor:
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        img = self._rgb(image)
        left, top, w, h = self.crop_box(img.size, generator)
        s = self.config.image_size
        # Resizing from a box avoids copying the crop and samples it at sub-pixel accuracy.
        out = img.resize((s, s), self._resample, box=(left, top, left + w, top + h))
        return _normalise(out, self._mean, self._std)

    def crop_box(self, size: tuple[int, int], generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """(left, top, width, height) of the crop for an image of `size` (W, H)."""
        width, height = size
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_r[0] + u[1] * (log_r[1] - log_r[0]))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return left, top, w, h
        return self._central_box(width, height)

    def _central_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        # No sample fitted (an extreme aspect ratio): the largest central crop within `ratio`.
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


# -------------------------------------------------------------------------------- Hugging Face configs


def to_hf_preprocessor_config(cfg: PreprocessConfig) -> dict[str, Any]:
    """The contents of a `preprocessor_config.json` for `CLIPImageProcessor` doing what `cfg` does."""
    s = cfg.image_size
    squash = cfg.resize_mode == "squash"
    resample = {v: k for k, v in _HF_RESAMPLE.items()}[cfg.interpolation]
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": s, "width": s} if squash else {"shortest_edge": s},
        "resample": resample,
        "do_center_crop": not squash,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.mean),
        "image_std": list(cfg.std),
    }


def from_hf_preprocessor_config(d: dict[str, Any]) -> PreprocessConfig:
    """Inverse of `to_hf_preprocessor_config`; also reads older files whose `size` / `crop_size` are ints.
    Pipelines this library cannot reproduce (resize 256 then crop 224, no rescale, ...) raise ValueError."""
    size = _hf_size(d.get("size", 224), "size")
    edge = size.get("shortest_edge", size.get("height"))
    crop = _hf_size(d.get("crop_size", edge), "crop_size")
    do_crop = d.get("do_center_crop", True)
    if "shortest_edge" in size:
        s = size["shortest_edge"]
        mode = "shortest"
        if not do_crop or crop != {"height": s, "width": s}:
            raise ValueError(
                f"preprocessor config: shortest_edge {s} needs a centre crop to {s}x{s}, got {crop}"
            )
    else:
        s = size["height"]
        mode = "squash"
        if size["width"] != s or (do_crop and crop != size):
            raise ValueError(f"preprocessor config: only square outputs are supported, got size={size}")
    resample = d.get("resample", 3)
    if resample not in _HF_RESAMPLE:
        raise ValueError(f"preprocessor config: resample {resample!r} is not one of {_HF_RESAMPLE}")
    if not d.get("do_resize", True) or not d.get("do_rescale", True):
        raise ValueError("preprocessor config: do_resize and do_rescale must be true")
    if not math.isclose(float(d.get("rescale_factor", 1 / 255)), 1 / 255, rel_tol=1e-6):
        raise ValueError(f"preprocessor config: rescale_factor must be 1/255, got {d['rescale_factor']}")
    normalize = d.get("do_normalize", True)
    mean = _triple(d.get("image_mean"), "image_mean") if normalize else (0.0, 0.0, 0.0)
    std = _triple(d.get("image_std"), "image_std") if normalize else (1.0, 1.0, 1.0)
    return PreprocessConfig(
        image_size=s, mean=mean, std=std, interpolation=_HF_RESAMPLE[resample], resize_mode=mode
    )


def _hf_size(v: Any, key: str) -> dict[str, int]:
    if isinstance(v, int):
        # Old files: `size` as an int meant the shortest edge; `crop_size` as an int meant a square.
        return {"shortest_edge": v} if key == "size" else {"height": v, "width": v}
    if isinstance(v, dict) and ("shortest_edge" in v or {"height", "width"} <= set(v)):
        return {k: int(x) for k, x in v.items() if k in ("shortest_edge", "height", "width")}
    raise ValueError(f"preprocessor config: cannot read {key}={v!r} (want shortest_edge or height/width)")


def _triple(v: Any, key: str) -> tuple[float, float, float]:
    if v is None:
        raise ValueError(f"preprocessor config: {key} is missing")
    if isinstance(v, (int, float)):
        v = [v] * 3
    if len(v) != 3:
        raise ValueError(f"preprocessor config: {key} needs three values, got {v!r}")
    return (float(v[0]), float(v[1]), float(v[2]))
