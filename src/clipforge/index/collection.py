"""`Collection`: the collection core (store.py) with every way in (ingest.py) and every query (query.py,
rank.py, quality.py) behind one object, the Python API. The core imports none of these."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import calibrate, ingest, rank
from .quality import dedup_groups
from .query import query_vector
from .rank import Ranking
from .store import Store
from .types import AddReport, EncoderLike, Hit, QueryError, check_k


class Collection(Store):
    """Vectors + metadata in a folder; add files, folders, manifests, shards, embedding folders and captions;
    search by text, image, vector and keywords. See store.py for the folder and its crash safety."""

    _background: tuple[int, np.ndarray] | None = None

    @classmethod
    def create_for(cls, path: str | Path, encoder: EncoderLike, *, index: str = "auto") -> Collection:
        """A new empty collection for `encoder`'s vectors, reading relevance with its model's calibration
        (relevance.json in the model folder, see calibrate.py) when it has one."""
        return cls.create(
            path,
            identity=encoder.identity,
            dim=encoder.dim,
            index=index,
            relevance=calibrate.model_calibration(encoder),
        )

    # ---- writing ------------------------------------------------------------------------------------
    def add(
        self,
        items: str | Path | Iterable[str | Path],
        encoder: EncoderLike | None = None,
        *,
        batch_size: int = 64,
        progress: bool = False,
        workers: int | None = None,
        exact_decode: bool = False,
        video_interval: float | None = None,
        video_max_frames: int | None = None,
    ) -> AddReport:
        """Add image and video files and folders (recursively; a video is one row per sampled frame, keyed
        `VIDEO#t=SECONDS`), JSONL/CSV/TSV manifests, webdataset shards and `clipforge embed` folders
        (ingest.py). Unchanged files (same path, same sha256) are skipped, changed
        ones replaced; unreadable images are reported in `failed` and never stop the others.

        With a clipforge `Encoder`, files are hashed, decoded (fast JPEG path unless `exact_decode`) and
        preprocessed in `workers` processes (default: cores - 1; 0: in this process), see embed.py.

        Videos: a frame every `video_interval` seconds (default 5), at most `video_max_frames` per video
        (default 120; a longer video's frames are spread over it). Given either, a stored video sampled at
        other moments is sampled again; not given, stored videos keep their sampling (videos.py). Bad
        values raise SamplingError."""
        inputs = [items] if isinstance(items, (str, Path)) else list(items)
        pipeline = ingest.Pipeline(
            batch_size, workers, exact_decode, progress, video_interval, video_max_frames
        )
        return ingest.add_inputs(self, inputs, encoder, pipeline)

    def add_texts(
        self, texts: Iterable[str], encoder: EncoderLike, metadata: dict | list[dict] | None = None
    ) -> list[int]:
        """Store captions (no image) for image-to-text search. A caption already stored keeps its row."""
        return ingest.add_captions(self, list(texts), encoder, metadata)

    def sync(
        self,
        folder: str | Path,
        encoder: EncoderLike,
        *,
        batch_size: int = 64,
        progress: bool = False,
        workers: int | None = None,
        exact_decode: bool = False,
        video_interval: float | None = None,
        video_max_frames: int | None = None,
    ) -> AddReport:
        """Make the rows under `folder` match it: add new and changed files, remove rows whose files are
        gone (`removed` in the report). Videos are sampled as `add` samples them."""
        pipeline = ingest.Pipeline(
            batch_size, workers, exact_decode, progress, video_interval, video_max_frames
        )
        return ingest.sync(self, folder, encoder, pipeline)

    # ---- reading ------------------------------------------------------------------------------------
    def search(
        self,
        *,
        text: str | list[str] | None = None,
        image: Any = None,
        vector: np.ndarray | None = None,
        weights: tuple[float, float] = (1.0, 1.0),
        negative: str | list[str] | None = None,
        negative_weight: float = 0.5,
        k: int = 10,
        encoder: EncoderLike | None = None,
        mode: str | None = None,
        min_relevance: float | None = None,
        sort: str = "relevance",
        **filters: Any,
    ) -> list[Hit]:
        """Top-k items for a query; the score is the weighted sum of cosines (query.py), `relevance` a
        calibrated estimate in [0, 1] (rank.py).

        mode: "vector", "keyword" (text only, no encoder needed) or "hybrid" (default when there is text and
        the collection has a keyword index). min_relevance: drop hits below it (None, the default here, in
        the CLI and in the HTTP API: the plain top k; rank.DEFAULT_MIN_RELEVANCE is the measured suggestion).
        sort: "relevance" or "date" (newest first, among the hits kept). Filters: path_prefix, added_after, added_before (Unix time), after, before (an item's
        date: "taken_at" metadata, else when added; ISO 8601 or Unix time), camera (substring of the "camera"
        metadata), modality ("image": items with a file, "text": bare captions)."""
        ranking = Ranking(mode, min_relevance, sort)
        k = check_k(k)
        if encoder is not None:
            self.check_encoder(encoder)
        q = None
        if ranking.mode != "keyword":
            q = query_vector(self.dim, encoder, text, image, vector, weights, negative, negative_weight)
        elif text is None:
            raise QueryError("keyword search needs text=")
        plain = image is None and vector is None and negative is None
        return self.rank(q, rank.query_words(text, ranking, plain), k=k, ranking=ranking, **filters)

    def rank(
        self, q: np.ndarray | None, words: list[str], *, k: int, ranking: Ranking = Ranking(), **filters: Any
    ) -> list[Hit]:
        """The vectors-first search: a query vector q (D,) (None for keywords only) and query words
        (rank.query_words) -> hits. See `search` for the filters."""
        k = check_k(k)
        for name in ("after", "before"):
            filters[name] = rank.date_bound(filters.get(name), name)
        allowed = self.filter_ids(**filters)
        if allowed is not None and not len(allowed):
            return []
        return rank.rank(self, q, words, k, ranking, allowed, self._background_for(allowed, q))

    def _background_for(self, allowed: np.ndarray | None, q: np.ndarray | None) -> np.ndarray:
        if q is None:
            return np.zeros((0, self.dim), np.float32)
        if allowed is not None:
            return rank.background_sample(self, allowed)
        if self._background is None or self._background[0] != self.generation:
            self._background = (self.generation, rank.background_sample(self, None))
        return self._background[1]

    def calibrate(
        self,
        queries: list[tuple[str, str]],
        encoder: EncoderLike,
        *,
        label: str = "concept",
        k: int = calibrate.K,
    ) -> dict:
        """Fit how relevance is read from scores (relevance.py) on labelled searches and store it: each
        (caption, label) of `queries` is searched, and a top-k hit is relevant when its metadata[label] is the
        query's label (calibrate.read_queries reads them from JSONL). Returns what the fit measured."""
        self.check_encoder(encoder)
        cal, report = calibrate.calibrate(self, encoder, queries, label, check_k(k))
        self.set_relevance(cal)
        return report

    def dedup(self, threshold: float = 0.95, neighbours: int = 16) -> list[list[Hit]]:
        """Groups of near-duplicates: connected components of pairs with cosine >= threshold, found among each
        item's `neighbours` nearest. Each hit's score is its cosine to the group's first (lowest id) member."""
        return dedup_groups(self, threshold, neighbours)
