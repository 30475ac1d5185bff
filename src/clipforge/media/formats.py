"""Which file formats clipforge reads beyond Pillow's own, by extension, and the Pillow plug-ins that add them.

HEIC/HEIF come from pillow-heif, registered as a Pillow opener so that `Image.open` (and so
`clipforge.transforms.load_image`) reads them like any other format; AVIF is Pillow's own (built with
libavif since Pillow 11.2). Camera RAW files are not a Pillow format: `clipforge.media.raw` decodes them with
rawpy. All of these are optional: without the `[media]` extra the files fail as unrecognised images.
"""

from __future__ import annotations

import functools
import importlib.util

HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif"})
# The RAW formats LibRaw reads that cameras commonly write; CR2, NEF, ARW and DNG are the tested ones.
RAW_EXTENSIONS = frozenset(
    {".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2", ".raf", ".pef", ".srw"}
)
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".3gp", ".mts", ".m2ts"})
# Still-image formats beyond Pillow's usual ones, for folder walkers to add to their list.
EXTRA_IMAGE_EXTENSIONS = HEIF_EXTENSIONS | AVIF_EXTENSIONS | RAW_EXTENSIONS


@functools.cache
def register_plugins() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow, once per process. False when it is not installed.

    Deferred to the first decode rather than done at import, so that `import clipforge` stays light."""
    if importlib.util.find_spec("pillow_heif") is None:
        return False
    import pillow_heif

    pillow_heif.register_heif_opener()
    return True
