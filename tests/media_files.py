"""Sample files in the formats phones and cameras write, built by the tests themselves (nothing downloaded).

HEIC is written by pillow-heif, AVIF by Pillow, video by PyAV. No library here writes camera RAW, so
`dng_bytes` lays out a minimal DNG by hand (TIFF structure, DNG 1.4 tags): an optional JPEG preview in IFD0
and a 16-bit Bayer (RGGB) sensor image in a SubIFD; LibRaw reads both, the preview through extract_thumb and
the sensor data through its full development path.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_SIZE = {BYTE: 1, ASCII: 1, SHORT: 2, LONG: 4, RATIONAL: 8, SRATIONAL: 8}
EXIF_IFD, GPS_IFD = 34665, 34853


def exif_bytes(
    tags: dict[int, object], exif_ifd: dict[int, object] = (), gps: dict[int, object] = ()
) -> bytes:
    """EXIF as Pillow writes it: IFD0 `tags`, the Exif sub-IFD (dates, offsets) and the GPS IFD."""
    ex = Image.Exif()
    for k, v in tags.items():
        ex[k] = v
    for k, v in dict(exif_ifd).items():
        ex.get_ifd(EXIF_IFD)[k] = v
    for k, v in dict(gps).items():
        ex.get_ifd(GPS_IFD)[k] = v
    return ex.tobytes()


def jpeg_bytes(img: Image.Image, exif: bytes | None = None, quality: int = 90) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
    return b.getvalue()


def heic_bytes(img: Image.Image, exif: bytes | None = None) -> bytes:
    import pillow_heif

    pillow_heif.register_heif_opener()
    b = io.BytesIO()
    img.save(b, "HEIF", quality=90, **({"exif": exif} if exif else {}))
    return b.getvalue()


def avif_bytes(img: Image.Image, exif: bytes | None = None) -> bytes:
    b = io.BytesIO()
    img.save(b, "AVIF", quality=90, **({"exif": exif} if exif else {}))
    return b.getvalue()


def bayer(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64), level: int = 4095) -> np.ndarray:
    """A flat colour as RGGB sensor data (H, W) uint16 on a `level` white point."""
    w, h = size
    r, g, b = (round(c / 255 * level) for c in rgb)
    a = np.empty((h, w), np.uint16)
    a[0::2, 0::2], a[0::2, 1::2], a[1::2, 0::2], a[1::2, 1::2] = r, g, g, b
    return a


def dng_bytes(
    sensor: np.ndarray,
    preview: bytes | None = None,
    make: str = "Canon",
    model: str = "Canon EOS 5D",
    orientation: int = 1,
    taken: str | None = None,
) -> bytes:
    """A DNG: IFD0 holds the JPEG `preview` (or, without one, the sensor data itself), camera tags and the
    orientation; `taken` ("YYYY:MM:DD HH:MM:SS") goes in the Exif IFD as DateTimeOriginal."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")

    def blob(data: bytes) -> int:
        out.extend(b"\x00" * (len(out) % 2))
        off = len(out)
        out.extend(data)
        return off

    def ifd(entries: list[tuple[int, int, object]]) -> int:
        packed = []
        for tag, typ, vals in sorted(entries, key=lambda e: e[0]):
            data = _pack(typ, vals)
            inline = data if len(data) <= 4 else struct.pack("<I", blob(data))
            packed.append(struct.pack("<HHI", tag, typ, len(data) // _SIZE[typ]) + inline.ljust(4, b"\x00"))
        return blob(struct.pack("<H", len(packed)) + b"".join(packed) + b"\x00\x00\x00\x00")

    h, w = sensor.shape
    data = sensor.astype("<u2").tobytes()
    cfa = [
        (254, LONG, [0]), (256, LONG, [w]), (257, LONG, [h]), (258, SHORT, [16]), (259, SHORT, [1]),
        (262, SHORT, [32803]), (273, LONG, [blob(data)]), (277, SHORT, [1]), (278, LONG, [h]),
        (279, LONG, [len(data)]), (284, SHORT, [1]), (33421, SHORT, [2, 2]), (33422, BYTE, [0, 1, 1, 2]),
        (50717, LONG, [int(sensor.max()) or 1]),
    ]  # fmt: skip
    camera = [
        (271, ASCII, make), (272, ASCII, model), (274, SHORT, [orientation]),
        (50706, BYTE, [1, 4, 0, 0]), (50707, BYTE, [1, 1, 0, 0]), (50708, ASCII, f"{make} {model}"),
        (50721, SRATIONAL, [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]),
        (50778, SHORT, [21]),
    ]  # fmt: skip
    if taken is not None:
        camera.append((EXIF_IFD, LONG, [ifd([(36867, ASCII, taken)])]))
    if preview is None:
        top = cfa + camera
    else:
        pw, ph = Image.open(io.BytesIO(preview)).size
        top = camera + [
            (254, LONG, [1]), (256, LONG, [pw]), (257, LONG, [ph]), (258, SHORT, [8, 8, 8]), (259, SHORT, [7]),
            (262, SHORT, [6]), (273, LONG, [blob(preview)]), (277, SHORT, [3]), (278, LONG, [ph]),
            (279, LONG, [len(preview)]), (330, LONG, [ifd(cfa)]),
        ]  # fmt: skip
    out[4:8] = struct.pack("<I", ifd(top))
    return bytes(out)


def _pack(typ: int, vals: object) -> bytes:
    if typ == ASCII:
        return str(vals).encode() + b"\x00"
    if typ in (RATIONAL, SRATIONAL):
        f = "<II" if typ == RATIONAL else "<ii"
        return b"".join(struct.pack(f, n, d) for n, d in vals)
    return struct.pack("<" + {BYTE: "B", SHORT: "H", LONG: "I"}[typ] * len(vals), *vals)


def write_video(
    path: Path,
    seconds: float,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    tags: dict | None = None,
    rotation: float | None = None,
    codec: str = "libx264",
    draw=None,
) -> None:
    """A video whose frame i (shown at i / fps seconds) is a flat grey of level 3 * i (or `draw(i)`, an (H, W, 3)
    uint8 array), with a keyframe every second: a frame between keyframes tells decoding-to-the-moment from
    taking the keyframe before. `rotation`: the display matrix's counter-clockwise turn, as phones write it.
    `codec`: libx264 (.mp4) or libvpx (.webm, which every browser plays)."""
    import av

    with av.open(str(path), "w") as out:
        out.metadata.update(tags or {})
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(fps), **({"preset": "ultrafast"} if codec == "libx264" else {})}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(round(seconds * fps)):
            arr = np.full((size[1], size[0], 3), 3 * i, np.uint8) if draw is None else draw(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
