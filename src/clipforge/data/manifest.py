"""Deprecated: import from `clipforge.data.sources`, THE reader of every stage (its docstring and
docs/data.md give the rules). These names stay for code written against the old manifest module;
`ManifestError` is `SourceError` itself, not a second error class."""

from __future__ import annotations

from clipforge.data.sample import IMAGE_FIELDS, Sample, SampleError, clean_captions
from clipforge.data.sample import SourceError as ManifestError
from clipforge.data.sources import (
    CAPTION_SEPARATOR,
    IMAGE_SUFFIXES,
    MANIFEST_SUFFIXES,
    read_folder,
    read_manifest,
)

IMAGE_COLUMNS = IMAGE_FIELDS

__all__ = [
    "CAPTION_SEPARATOR",
    "IMAGE_COLUMNS",
    "IMAGE_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "ManifestError",
    "Sample",
    "SampleError",
    "clean_captions",
    "read_folder",
    "read_manifest",
]
