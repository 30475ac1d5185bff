"""Cost of reading EXIF (`clipforge.media.exif.read_metadata`) next to decoding the same file (`load_image`),
per image, on photo-sized JPEGs and HEICs carrying a phone's tags. The add path reads both, so the ratio is
the share of `index add`'s decode time that EXIF adds. Interleaved rounds, medians.

    python bench/exif_read.py [--images 5] [--rounds 3] [--width 1600] [--height 1200]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, load_average, median  # noqa: E402
from jpeg_draft import make_photo  # noqa: E402

from clipforge.media.exif import read_metadata  # noqa: E402
from clipforge.transforms import load_image  # noqa: E402


def phone_exif() -> bytes:
    ex = Image.Exif()
    ex[0x010F], ex[0x0110], ex[0x0112] = "Apple", "iPhone 12 Pro", 1
    ex.get_ifd(0x8769).update({0x9003: "2023:07:14 18:05:09", 0x9011: "+02:00"})
    ex.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.88), 3: "W", 4: (2.0, 17.0, 40.2)})
    return ex.tobytes()


def encoded(img: Image.Image, fmt: str) -> bytes:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    b = io.BytesIO()
    img.save(b, fmt, quality=90, exif=phone_exif())
    return b.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1200)
    a = p.parse_args()
    photos = [make_photo(a.width, a.height, seed) for seed in range(a.images)]
    print(f"load: {load_average()}; {a.images} images of {a.width}x{a.height}, {a.rounds} rounds\n")
    print("| format | read_metadata ms/img | load_image ms/img | EXIF / decode |")
    print("|---|---|---|---|")
    for fmt in ("JPEG", "HEIF"):
        files = [encoded(im, fmt) for im in photos]
        assert read_metadata(files[0])["camera"] == "Apple iPhone 12 Pro"
        t = interleaved(
            {
                "exif": lambda files=files: [read_metadata(f) for f in files],
                "decode": lambda files=files: [load_image(f) for f in files],
            },
            a.rounds,
        )
        exif, dec = (1000 * median(t[k]) / a.images for k in ("exif", "decode"))
        print(f"| {fmt} | {exif:.2f} | {dec:.1f} | {np.round(exif / dec * 100, 2)}% |")


if __name__ == "__main__":
    main()
