"""Turning the open corpus's drawings into training images: SVG rendering (resvg) and normalisation."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from clipforge.atomic import atomic_path

RENDER_WIDTH = 512  # render SVGs at this long side, never at their natural (sometimes huge) size
MAX_PNG_PIXELS = 40_000_000
# Old Inkscape/Sodipodi files size the page in real units but draw in 90-dpi user units.
_UNIT_TO_PX = {"pt": 1.25, "pc": 15.0, "mm": 90 / 25.4, "cm": 900 / 25.4, "in": 90.0, "px": 1.0}


class RenderError(ValueError):
    """A drawing that cannot become a training image (blank, too large, unrenderable)."""


def normalize_image(img: Image.Image, size: int, margin: float = 0.06, tol: int = 8) -> Image.Image:
    """Composite on white, crop to the non-white content, pad to a centred square with a margin, resize."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    # Content = pixels darker than white by more than `tol` in some channel (anti-aliasing haze is not).
    box = rgb.point(lambda v: 255 if v < 255 - tol else 0).getbbox()
    if box is None:
        raise RenderError("blank image (nothing but white)")
    content = rgb.crop(box)
    side = round(max(content.size) * (1 + 2 * margin))
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(content, ((side - content.width) // 2, (side - content.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _length_px(value: str) -> float | None:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(pt|pc|mm|cm|in|px)?\s*", value or "")
    return float(m.group(1)) * _UNIT_TO_PX[m.group(2) or "px"] if m else None


def fix_svg_size(svg: str) -> str:
    """Restate a root `width="400pt"`/`"210mm"` in px (resvg rejects unit sizes), adding the viewBox it implied."""
    m = re.search(r"<svg\b[^>]*>", svg, re.S)
    if not m:
        return svg
    tag = m.group(0)
    w, h = (re.search(rf'\s{a}="([^"]*)"', tag) for a in ("width", "height"))
    if not (w and h and re.search(r"[a-z]", w.group(1) + h.group(1))):
        return svg
    wp, hp = _length_px(w.group(1)), _length_px(h.group(1))
    if not wp or not hp:
        return svg
    new = tag.replace(w.group(0), f' width="{wp:.3f}"', 1).replace(h.group(0), f' height="{hp:.3f}"', 1)
    if "viewBox" not in tag:  # without one, user units were px at the old 90 dpi: the page is (wp, hp)
        new = new[:4] + f' viewBox="0 0 {wp:.3f} {hp:.3f}"' + new[4:]
    return svg[: m.start()] + new + svg[m.end() :]


def _svg_aspect(svg: str) -> float:
    """Width / height of the rendered page: width/height when given (they set the canvas), else the viewBox."""
    m = re.search(r"<svg\b[^>]*>", svg, re.S)
    tag = m.group(0) if m else ""
    w, h = (re.search(rf'\s{a}="([^"]*)"', tag) for a in ("width", "height"))
    wp, hp = (_length_px(x.group(1)) if x else None for x in (w, h))
    if wp and hp:
        return wp / hp
    vb = re.search(r'viewBox="\s*[-0-9.e]+[\s,]+[-0-9.e]+[\s,]+([0-9.e]+)[\s,]+([0-9.e]+)', tag)
    if vb and float(vb.group(2)) > 0:
        return float(vb.group(1)) / float(vb.group(2))
    return 1.0


def render_svg(svg: str, size: int, long_side: int = RENDER_WIDTH) -> Image.Image:
    """Render at a fixed long side; re-render larger when the drawing is a small part of a big page."""
    import resvg_py

    svg = fix_svg_size(svg)
    tall = _svg_aspect(svg) < 1.0

    def draw(side: int) -> Image.Image:
        kw = {"height": side} if tall else {"width": side}
        return Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=svg, **kw))))

    img = draw(long_side)
    box = img.getchannel("A").getbbox() if img.mode == "RGBA" else None
    if box and max(box[2] - box[0], box[3] - box[1]) < size:
        scale = min(8.0, 2 * size / max(box[2] - box[0], box[3] - box[1], 1))
        img = draw(int(long_side * scale))
    return img


def load_png(path: str, max_pixels: int = MAX_PNG_PIXELS) -> Image.Image:
    """Open a PNG, refusing decompression bombs before decoding the pixels."""
    with Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise RenderError(f"{path}: {im.width}x{im.height} is over {max_pixels} pixels")
        im.load()
        return im.copy()


def render_task(task: tuple[str, str, str, str, int]) -> tuple[str, str]:
    """Worker: render one item to its PNG. Returns (id, '' or the failure reason)."""
    ident, kind, src, out, size = task
    try:
        if kind == "png":
            img = load_png(src)
        else:
            text = Path(src).read_text("utf-8", errors="replace") if kind == "svg_file" else src
            img = render_svg(text, size)
        img = normalize_image(img, size)
    except (ValueError, OSError, Image.DecompressionBombError) as e:
        return ident, f"{type(e).__name__}: {str(e)[:120]}"
    # never leave a half-written PNG behind an interrupted run; a lost one is simply rendered again
    with atomic_path(out, durable=False) as tmp:
        img.save(tmp, format="PNG", optimize=False)
    return ident, ""
