"""Camera RAW files (CR2, NEF, ARW, DNG, ...) through rawpy (LibRaw).

Most RAW files embed a full-size or near full-size JPEG preview, already developed by the camera: decoding it
is 10-100x faster than developing the sensor data and is what the photographer saw, so it comes first.
A file without a usable preview (none, a tiny thumbnail, or a corrupt one) is developed with LibRaw instead.
Both paths call the caller's size guard with the dimensions LibRaw reads from the header before any pixel
is decoded. This module knows nothing of clipforge's error classes: `clipforge.transforms.load_image` calls it
inside the context that names the file in its errors.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from typing import BinaryIO

from PIL import Image, ImageOps

from .formats import RAW_EXTENSIONS

# A preview whose shorter side is below this is a thumbnail: embedding it would lose the detail a model sees
# at 224-336 px, so the sensor data is developed instead.
MIN_PREVIEW_SIDE = 224
_HEAD = 64 * 1024  # IFD0 of every TIFF-based RAW we know lies well inside the first 64 KiB
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_NEW_SUBFILE_TYPE, _SUB_IFDS, _DNG_VERSION = 254, 330, 50706
# LibRaw's `flip` -> the PIL transpose that makes the picture upright (0: already upright).
_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}

SizeCheck = Callable[[tuple[int, int]], None]


def is_raw(fp: BinaryIO, name: str | None = None) -> bool:
    """Whether `fp` holds a camera RAW file, judged from `name`'s extension or from its first bytes (the
    stream position is kept). Content matters because bytes often arrive without a name, and because a
    TIFF-based RAW opened by Pillow would silently give its IFD0 thumbnail instead of the photo."""
    if name is not None and os.path.splitext(name)[1].lower() in RAW_EXTENSIONS:
        return True
    if not (hasattr(fp, "seekable") and fp.seekable()):
        return False  # Pillow buffers such a stream itself; a RAW one then needs its name to be recognised
    pos = fp.tell()
    try:
        head = fp.read(_HEAD) or b""
    finally:
        fp.seek(pos)
    return _raw_signature(head)


def _raw_signature(head: bytes) -> bool:
    if head[4:12] == b"ftypcrx ":  # CR3 (ISO base media)
        return True
    if head.startswith((b"FUJIFILMCCD-RAW", b"IIRO", b"IIRS", b"IIU\x00")):  # RAF, ORF, RW2
        return True
    if head[:4] not in _TIFF_MAGIC:
        return False
    if head[8:10] == b"CR":  # CR2: a TIFF with Canon's marker after the header
        return True
    tags = _ifd0_tags(head)
    # DNG says so; NEF, ARW and PEF start with a reduced-resolution IFD0 whose SubIFDs hold the sensor data.
    return _DNG_VERSION in tags or (tags.get(_NEW_SUBFILE_TYPE, 0) & 1 == 1 and _SUB_IFDS in tags)


def _ifd0_tags(head: bytes) -> dict[int, int]:
    """Tag -> first value (as an int, for SHORT/LONG; 0 for anything else) of a TIFF's IFD0, from `head`.
    Anything malformed yields what was read so far: this is a sniff, the decoder reports real errors."""
    e = "<" if head[:2] == b"II" else ">"
    tags: dict[int, int] = {}
    try:
        (off,) = struct.unpack_from(e + "I", head, 4)
        (n,) = struct.unpack_from(e + "H", head, off)
        for i in range(min(n, 512)):
            tag, typ, _, value = struct.unpack_from(e + "HHI4s", head, off + 2 + 12 * i)
            fmt = {3: "H", 4: "I"}.get(typ)
            tags[tag] = struct.unpack_from(e + fmt, value)[0] if fmt else 0
    except struct.error:
        pass
    return tags


def decode_raw(
    fp: BinaryIO, check_size: SizeCheck, min_preview: int = MIN_PREVIEW_SIDE
) -> Image.Image | None:
    """The picture in a RAW file, upright, fully loaded: the embedded JPEG or bitmap preview when its shorter
    side is at least `min_preview`, else the sensor data developed at half size. None when LibRaw does not
    recognise the file or when rawpy is not installed (the caller then tries Pillow, which reads a DNG's or
    NEF's first image as a TIFF, as it did before RAW support). Raises rawpy's LibRawError on a corrupt file,
    and whatever `check_size` raises for a size it refuses."""
    try:
        import rawpy
    except ImportError:
        return None
    try:
        raw = rawpy.imread(fp)  # reads the header and metadata; sensor data is unpacked on demand
    except rawpy.LibRawFileUnsupportedError:
        fp.seek(0)
        return None
    with raw:
        s = raw.sizes
        check_size((s.raw_width, s.raw_height))  # the unpacked sensor data is this large
        preview = _preview(raw, check_size, min_preview)
        if preview is not None:
            return preview
        check_size((s.iwidth, s.iheight))
        # Half size skips demosaicing (each 2x2 Bayer block becomes one pixel): 4x fewer pixels and much
        # faster, still far above what a CLIP model looks at. LibRaw applies the file's orientation itself.
        rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    return Image.fromarray(rgb, "RGB")


def _preview(raw, check_size: SizeCheck, min_preview: int) -> Image.Image | None:
    import rawpy

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        img = Image.fromarray(thumb.data, "RGB")
        check_size(img.size)
        oriented = False
    else:
        try:
            img = Image.open(io.BytesIO(thumb.data))
            check_size(img.size)  # from the JPEG header, before decoding it
            if min(img.size) < min_preview:
                return None
            img.load()
        except (OSError, SyntaxError):  # a corrupt preview: the sensor data may still be fine
            return None
        oriented = img.getexif().get(0x0112, 1) != 1
    if min(img.size) < min_preview:
        return None
    if oriented:
        img = ImageOps.exif_transpose(img)
    elif raw.sizes.flip in _FLIP:
        img = img.transpose(_FLIP[raw.sizes.flip])
    img.info.pop("exif", None)  # upright now: no orientation tag may be applied a second time
    return img
