"""What a photo's EXIF says about it: when it was taken, with which camera, where, and which way up.

Only headers are read (Pillow parses the EXIF block without decoding pixels), so this costs a small
fraction of a decode. Cameras, phones and editors write every kind of malformed tag (zero dates, empty
strings, rationals over zero, padding NULs), so each field is parsed on its own and a bad one is left out;
only a file that is not an image at all raises (`ImageError`, like `load_image`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from datetime import datetime, timedelta, timezone
from typing import Any

from PIL import Image

from clipforge.transforms import ImageError

from .formats import register_plugins
from .raw import is_raw

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _ORIENTATION, _DATE_TIME = 0x010F, 0x0110, 0x0112, 0x0132
_DATE_ORIGINAL, _DATE_DIGITIZED, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL = 0x9003, 0x9004, 0x9011, 0x9291
_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4


def read_metadata(src: str | os.PathLike | bytes, name: str | None = None) -> dict[str, Any]:
    """`taken_at` (ISO 8601, with the UTC offset when the file records it), `camera` ("Make Model"), `gps`
    ({"lat", "lon"} in degrees) and `orientation` (EXIF 1-8; HEIC's decoder applies it itself and reports 1),
    each only when present and well-formed.
    Works on JPEG, PNG, WebP, TIFF, HEIC/AVIF and camera RAW (TIFF-based ones read by Pillow, the others
    through the EXIF header LibRaw builds for their preview from the RAW's own metadata). Raises
    ImageError only when `src` is not a readable image."""
    label = name or (os.fspath(src) if not isinstance(src, bytes) else "<bytes>")
    exif = _exif(src, label)
    out: dict[str, Any] = {}
    for key, parse in (("taken_at", _taken_at), ("camera", _camera), ("gps", _gps), ("orientation", _orient)):
        try:
            value = parse(exif)
        except Exception:  # noqa: BLE001 - a malformed tag is left out, never an error
            value = None
        if value is not None:
            out[key] = value
    return out


def row_metadata(src: str | os.PathLike | bytes, name: str | None = None) -> dict[str, Any]:
    """`read_metadata` for an indexer that has already decoded the file: a header it cannot re-read (the
    file changed meanwhile) gives no metadata rather than failing a row whose vector is good."""
    try:
        return read_metadata(src, name)
    except ImageError:
        return {}


def _exif(src: str | os.PathLike | bytes, label: str) -> Image.Exif:
    register_plugins()
    data = src if isinstance(src, bytes) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and reads what it can
            with Image.open(io.BytesIO(data) if data is not None else os.fspath(src)) as img:
                return _with_ifds(img.getexif())
    except Image.UnidentifiedImageError as e:
        preview = _raw_preview(data if data is not None else src, label)
        if preview is None:
            raise ImageError(f"{label}: not a recognised image file") from e
        exif = _exif(preview, label)
        # LibRaw prefixes the preview with an EXIF header of its own, built from the RAW's metadata, where
        # DateTime is the capture time (there is no DateTimeOriginal in it).
        sub = exif.get_ifd(_EXIF_IFD)
        if _DATE_ORIGINAL not in sub and _DATE_TIME in exif:
            sub[_DATE_ORIGINAL] = exif[_DATE_TIME]
        return exif
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{label}: cannot read image header ({type(e).__name__}: {e})") from e


def _with_ifds(exif: Image.Exif) -> Image.Exif:
    # Parse the sub-IFDs now, while the file is open; a broken one is an empty IFD, not an error.
    for ifd in (_EXIF_IFD, _GPS_IFD):
        try:
            exif.get_ifd(ifd)
        except Exception:  # noqa: BLE001 - garbage pointers lose that IFD's fields only (see read_metadata)
            pass
    return exif


def _raw_preview(src: str | os.PathLike | bytes, label: str) -> bytes | None:
    """The embedded JPEG of a RAW file Pillow cannot parse (CR3, RAF, RW2, ...), which carries the camera's
    EXIF; recognised by name or content, like `load_image` does."""
    try:
        import rawpy
    except ImportError:
        return None
    try:
        with io.BytesIO(src) if isinstance(src, bytes) else open(src, "rb") as fp:
            if not is_raw(fp, label):
                return None
            with rawpy.imread(fp) as raw:
                thumb = raw.extract_thumb()
    except (rawpy.LibRawError, OSError):
        return None
    return thumb.data if thumb.format.name == "JPEG" else None


def _text(v: Any) -> str | None:
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        return None
    v = v.replace("\x00", " ").strip()
    return v or None


def _taken_at(exif: Image.Exif) -> str | None:
    sub = exif.get_ifd(_EXIF_IFD)
    for tag in (_DATE_ORIGINAL, _DATE_DIGITIZED):
        text = _text(sub.get(tag))
        if text is None:
            continue
        try:
            when = datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
        except ValueError:  # "0000:00:00 00:00:00", blanks, other spellings
            continue
        subsec = _text(sub.get(_SUBSEC_ORIGINAL)) if tag == _DATE_ORIGINAL else None
        if subsec and subsec.isdigit():
            when = when.replace(microsecond=int(subsec[:6].ljust(6, "0")))
        offset = _offset(_text(sub.get(_OFFSET_ORIGINAL)))
        when = when.replace(tzinfo=offset) if offset else when
        return when.isoformat(timespec="milliseconds" if when.microsecond else "seconds")
    return None


def _offset(text: str | None) -> timezone | None:
    """ "+02:00" -> UTC+2; anything else -> None."""
    if not text or len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        return None
    try:
        minutes = int(text[1:3]) * 60 + int(text[4:6])
    except ValueError:
        return None
    if minutes > 14 * 60:
        return None
    return timezone((1 if text[0] == "+" else -1) * timedelta(minutes=minutes))


def _camera(exif: Image.Exif) -> str | None:
    make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
    if not model:
        return make
    # "Canon" + "Canon EOS 5D", "NIKON CORPORATION" + "NIKON D750": the model already names the maker.
    if not make or model.lower().startswith(make.split()[0].lower()):
        return " ".join(model.split())
    return " ".join(f"{make} {model}".split())


def _gps(exif: Image.Exif) -> dict[str, float] | None:
    gps = exif.get_ifd(_GPS_IFD)
    if _LAT not in gps or _LON not in gps:
        return None
    lat = _degrees(gps[_LAT], _text(gps.get(_LAT_REF)), "S")
    lon = _degrees(gps[_LON], _text(gps.get(_LON_REF)), "W")
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180:
        return None
    return {"lat": round(lat, 7), "lon": round(lon, 7)}


def _degrees(dms: Any, ref: str | None, negative: str) -> float | None:
    d, m, s = (float(x) for x in dms)
    value = d + m / 60 + s / 3600
    if not math.isfinite(value):
        return None
    return -value if ref and ref.upper().startswith(negative) else value


def _orient(exif: Image.Exif) -> int | None:
    v = exif.get(_ORIENTATION)
    return int(v) if isinstance(v, int) and 1 <= v <= 8 else None
