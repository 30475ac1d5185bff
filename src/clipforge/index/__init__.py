"""Visual search: a persistent, crash-safe collection of CLIP vectors (FAISS) with metadata (SQLite)."""

from clipforge.media.video import SamplingError

from .collection import Collection
from .types import AddReport, CollectionError, EncoderLike, Hit, ModelMismatchError, QueryError, WriteError

__all__ = [
    "AddReport",
    "Collection",
    "CollectionError",
    "EncoderLike",
    "Hit",
    "ModelMismatchError",
    "QueryError",
    "SamplingError",
    "WriteError",
]
