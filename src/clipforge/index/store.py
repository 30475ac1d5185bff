"""A collection: a folder holding a SQLite database (the truth) and a FAISS snapshot (derived from it).

    collection.json        model identity, dim, metric, index kind, clipforge version, relevance calibration
    items.sqlite           one row per item, with its vector and the generation that wrote it (WAL mode)
    index.<kind>.<gen>.faiss   the index as of generation <gen>, written atomically, throttled
    scratch/               intermediate files of an add in progress (the embeddings of a manifest)

Crash safety: each batch is one SQLite transaction, and a batch counts as committed once that transaction is.
The FAISS file may lag behind or be absent; `open()` loads the newest readable snapshot and reconciles it with
the database (adds missing rows, drops ids no longer there), so after any crash index and database agree.
Ids come from SQLite AUTOINCREMENT and are never reused, which makes that reconciliation by id set exact.
For the same reason a snapshot that cannot be written (a full disk) is only a warning: the committed rows are
safe, and the next open rebuilds the index from them. A failed database write raises WriteError, saying how
many items the call had committed before it. Opening for writing removes what a killed writer left behind:
temp files of unfinished snapshots and the scratch folder.

`Store` is the core: lookups, commits, vector and keyword search over stored rows, removal. It imports nothing
above it; adding files and folders (ingest.py), queries from text and images (query.py) and near-duplicates
(quality.py) are built on its public methods, and `Collection` (collection.py) puts them behind one object.
All SQL is in db.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from . import ann, db, files, folder, recall
from .arrays import as_matrix, unit
from .relevance import FIXED, Calibration
from .types import CollectionError, EncoderLike, Hit, QueryError, WriteError, check_identity, check_k

FORMAT = 1
SNAPSHOT_EVERY = 16  # batches between snapshots; open() replays the rest from the database
SNAPSHOT_SECONDS = 60.0
EXACT_FILTER_LIMIT = 20_000  # a filter this selective is answered exactly from the database vectors
RECORD_KEYS = ("path", "key", "caption", "sha256", "size", "mtime", "metadata", "added")
FILTERS = ("path_prefix", "added_after", "added_before", "modality", "after", "before", "camera")
log = logging.getLogger(__name__)


def hit_from_row(row: tuple, score: float) -> Hit:
    id_, key, caption, sha, size, mtime, added, meta = row
    return Hit(int(id_), float(score), key, caption, json.loads(meta), sha, size, mtime, added)


class Store:
    """Vectors + metadata in a folder: the collection core. See the module docstring."""

    def __init__(self, path: Path, config: dict, readonly: bool) -> None:
        self.path = path
        self.config = config
        self.identity: dict = config["model"]
        self.dim: int = int(config["dim"])
        self.kind: str = config["index"]
        self.readonly = readonly
        self.relevance: Calibration = self._stored_relevance(config)
        self._config_stamp = self._stamp()
        self._lock = None if readonly else folder.take_lock(path)
        try:
            self.conn = db.connect(path / "items.sqlite", readonly)
        except (OSError, sqlite3.OperationalError) as e:
            if self._lock is not None:
                self._lock.close()
            if readonly:
                raise CollectionError(f"cannot read collection {path} (items.sqlite): {e}") from e
            raise WriteError(f"cannot write collection {path} (opening items.sqlite): {e}") from e
        if not readonly:
            folder.remove_leftovers(path)
        self._gen = -1  # generation the in-memory index reflects
        self._saved_gen = -1  # generation of the newest snapshot on disk
        self._unsaved_batches = 0
        self._last_save = time.monotonic()
        self._recall: tuple[int, float] | None = None
        self._ann = self._load_index()

    # ---- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        identity: dict,
        dim: int,
        index: str = "auto",
        relevance: Calibration | None = None,
    ) -> Store:
        """A new empty collection for vectors of the model `identity` names; `relevance`: the model's
        relevance calibration (relevance.py; None: the fixed mapping until `set_relevance`)."""
        path = Path(path)
        ann.effective_kind(index, 0)  # validates the name
        if (path / "collection.json").exists():
            raise CollectionError(f"a collection already exists at {path}; use Collection.open")
        if not isinstance(identity, dict) or "fingerprint" not in identity:
            raise CollectionError(f"identity must be a dict with a 'fingerprint', got {identity!r}")
        if "dim" in identity and int(identity["dim"]) != int(dim):
            raise CollectionError(f"identity says dim {identity['dim']} but dim={dim} was given")
        config = {
            "format": FORMAT,
            "model": {**identity, "dim": int(dim)},
            "dim": int(dim),
            "metric": "inner_product",
            "index": index,
            "clipforge_version": folder.version(),
        }
        if relevance is not None:
            config["relevance"] = relevance.to_dict()
        with folder.writing(path, "creating it"):
            path.mkdir(parents=True, exist_ok=True)
            db.connect(path / "items.sqlite", readonly=False).close()
            folder.write_config(path, config)  # last: its presence marks a complete folder
        return cls(path, config, readonly=False)

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Store:
        path = Path(path)
        return cls(path, folder.read_config(path), readonly)

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            if not self.readonly and self._gen != self._saved_gen:
                self._snapshot()
        finally:
            self.conn.close()
            self.conn = None
            if self._lock is not None:
                self._lock.close()

    @contextlib.contextmanager
    def scratch(self) -> Iterator[Path]:
        """A new empty folder inside the collection for an add's intermediate files; removed on exit, or at
        the next open for writing if this process dies first (so a killed add leaves nothing anywhere)."""
        self.check_writable()
        tmp = self.path / folder.SCRATCH / uuid.uuid4().hex
        with folder.writing(self.path, "scratch folder"):
            tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def counting_commits(self) -> Iterator[None]:
        """Let a WriteError raised inside say how many items the block committed before it failed."""
        start = db.generation(self.conn)
        try:
            yield
        except WriteError as e:
            with contextlib.suppress(sqlite3.Error):
                e.committed = db.count_since(self.conn, start)
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self._ann.ntotal

    # ---- index <-> database -------------------------------------------------------------------------
    def _load_index(self) -> ann.VectorIndex:
        for gen, kind, p in folder.snapshots(self.path):
            try:
                index = ann.VectorIndex.load(p, kind, self.dim)
            except (OSError, RuntimeError, ValueError):
                continue  # deleted by the writer meanwhile, or unreadable: an older one or the db will do
            self._ann, self._gen, self._saved_gen = index, gen, gen
            self.refresh(force=True)  # HNSW snapshots keep tombstoned vectors: always re-derive them
            if self._kind_fits():
                return self._ann
            break
        return self._rebuild()

    def _rebuild(self) -> ann.VectorIndex:
        """Build the index from every vector in the database."""
        gen = db.generation(self.conn)
        parts = list(db.iter_vectors(self.conn, self.dim))
        ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        vecs = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, self.dim), np.float32)
        self._ann = ann.VectorIndex.build(ann.effective_kind(self.kind, len(ids)), self.dim, vecs, ids)
        self._gen = gen
        return self._ann

    def _kind_fits(self) -> bool:
        """Is the in-memory index the kind wanted at this size? A trained IVF-PQ stays, whatever its size."""
        if self.kind == "ivfpq" and self._ann.kind == "ivfpq":
            return True
        return ann.effective_kind(self.kind, self._ann.ntotal) == self._ann.kind

    def train_index(self, sample: np.ndarray, n_total: int) -> None:
        """Give an empty "ivfpq" collection an IVF-PQ index trained on `sample` (N, D), for a bulk load of
        `n_total` vectors that then arrive in chunks (see bulk.py): nothing needs them all in memory."""
        self.check_writable()
        if self.kind != "ivfpq" or len(self):
            raise CollectionError(
                f"train_index needs an empty 'ivfpq' collection; {self.path} is {self.kind!r}"
            )
        x = unit(as_matrix(sample, self.dim, "training sample"))
        self._ann = ann.VectorIndex.build("ivfpq", self.dim, x, np.zeros(0, np.int64), n_total=n_total)

    def _stored_relevance(self, config: dict) -> Calibration:
        """How relevance is read from scores (relevance.py): the calibration fitted for the model that
        collection.json holds, else the fixed mapping."""
        stored = config.get("relevance")
        return FIXED if stored is None else Calibration.from_dict(stored, str(self.path / folder.CONFIG))

    def _stamp(self) -> tuple[int, int]:
        st = (self.path / folder.CONFIG).stat()
        return st.st_mtime_ns, st.st_size

    def refresh(self, force: bool = False) -> None:
        """Catch the in-memory index up with the database (rows others committed since we last looked), and
        the relevance calibration up with collection.json (`index calibrate` run by another process)."""
        stamp = self._stamp()
        if stamp != self._config_stamp:
            self.config = folder.read_config(self.path)
            self.relevance, self._config_stamp = self._stored_relevance(self.config), stamp
        gen = db.generation(self.conn)
        if gen == self._gen and not force:
            return
        in_db, in_index = db.all_ids(self.conn), self._ann.live_ids()
        self._ann.remove(np.setdiff1d(in_index, in_db))
        new = np.setdiff1d(in_db, in_index)
        for start in range(0, len(new), 65536):
            chunk = new[start : start + 65536]
            self._ann.add(db.vectors_for(self.conn, chunk, self.dim), chunk)
        self._gen = gen

    def _snapshot(self, strict: bool = False) -> None:
        """Write the index as of this generation and delete older snapshots. A failure only warns unless
        `strict`: the rows are committed, and the next open rebuilds what the snapshot lacks from them."""
        target = self.path / f"index.{self._ann.kind}.{self._gen}.faiss"
        self._unsaved_batches, self._last_save = 0, time.monotonic()  # a failed write waits its turn too
        try:
            with folder.writing(self.path, "index snapshot"):
                self._ann.save(target)
                for _, _, p in folder.snapshots(self.path):
                    if p != target:
                        p.unlink(missing_ok=True)
        except WriteError as e:
            if strict:
                raise
            log.warning("%s; every committed item is stored, and the next open rebuilds the index", e)
            return
        self._saved_gen = self._gen

    def save(self) -> None:
        """Write the index snapshot now (it is otherwise written every few batches and at close)."""
        self.check_writable()
        if self._gen != self._saved_gen:
            self._snapshot(strict=True)

    def check_writable(self) -> None:
        if self.conn is None:
            raise CollectionError(f"collection {self.path} is closed")
        if self.readonly:
            raise CollectionError(f"collection {self.path} was opened readonly")

    def commit(self, vectors: np.ndarray, records: list[dict], drop: Iterable[int] = ()) -> list[int]:
        """One transaction: delete the rows `drop`, insert `records` with their unit `vectors` (N, D); then
        mirror it in the index. Returns the new rows' ids. Callers validate records (see add_vectors)."""
        self.check_writable()
        drop = [int(i) for i in drop]
        with folder.writing(self.path, "commit"):
            gen, ids = db.write_batch(self.conn, vectors, records, drop)
        self._ann.remove(np.asarray(drop, np.int64))
        self._ann.add(vectors, np.asarray(ids, np.int64))
        self._gen = gen
        if not self._kind_fits():
            self._rebuild()  # "auto" crossed a size threshold, or IVF-PQ now has enough to train
        self._unsaved_batches += 1
        overdue = time.monotonic() - self._last_save > SNAPSHOT_SECONDS
        if self._unsaved_batches >= SNAPSHOT_EVERY or overdue:
            self._snapshot()
        return ids

    # ---- writing ------------------------------------------------------------------------------------
    def lookup(self, key: str) -> list[tuple[int, str | None]]:
        """(id, sha256) of the rows stored under `key` (a file's normalised path, or a user key)."""
        return db.lookup(self.conn, key)

    def frame_rows(self, video: str) -> list[tuple[int, str | None]]:
        """(id, sha256) of the rows of a video's sampled frames (keys `VIDEO#t=SECONDS`)."""
        return db.rows_with_prefix(self.conn, files.frame_prefix(video))

    def frame_keys(self, video: str) -> list[str]:
        """The keys of a video's stored frames, `VIDEO#t=SECONDS`: which moments it was sampled at."""
        return list(db.keys_with_prefix(self.conn, files.frame_prefix(video)))

    def caption_id(self, sha256: str) -> int | None:
        """The id of the stored bare caption with this text hash (files.text_sha), if any."""
        return db.caption_id(self.conn, sha256)

    def keys_under(self, root: str | Path) -> dict[str, list[int]]:
        """key -> ids of the rows stored under the folder `root` (normalised)."""
        return db.keys_under(self.conn, files.normalise(root))

    def set_relevance(self, calibration: Calibration) -> None:
        """Store the relevance calibration searches read hits' relevance with (collection.json, atomically)."""
        self.check_writable()
        config = {**self.config, "relevance": calibration.to_dict()}
        folder.write_config(self.path, config)
        self.config, self.relevance, self._config_stamp = config, calibration, self._stamp()

    def check_encoder(self, encoder: EncoderLike) -> None:
        """Raise ModelMismatchError unless `encoder` is the model this collection was built with."""
        check_identity(self.identity, encoder, self.path)

    def add_vectors(self, vectors: np.ndarray, records: list[dict]) -> list[int]:
        """Store precomputed vectors (N, D) with one record each, as one committed batch; returns ids."""
        self.check_writable()
        x = as_matrix(vectors, self.dim, "vectors")
        if len(records) != len(x):
            raise ValueError(f"got {len(x)} vectors but {len(records)} records")
        norms = np.linalg.norm(x, axis=1)
        if (norms < 1e-6).any():
            raise ValueError(
                f"vectors {np.flatnonzero(norms < 1e-6)[:10].tolist()} are zero; cannot normalise"
            )
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ValueError(f"record {i} must be a dict, got {type(rec).__name__}")
            unknown = set(rec) - set(RECORD_KEYS)
            if unknown:
                raise ValueError(
                    f"record {i} has unknown keys {sorted(unknown)}; valid: {', '.join(RECORD_KEYS)}"
                )
            if not isinstance(rec.get("metadata") or {}, dict):
                raise ValueError(f"record {i}: metadata must be a dict")
            json.dumps(rec.get("metadata") or {})  # fails here, before anything is written
        return self.commit(x / norms[:, None], records)

    def remove(self, paths_or_ids: Any) -> int:
        """Remove by id, file path (a video's: all its frames) or folder (everything under it). Returns how many rows went."""
        self.check_writable()
        items = (
            [paths_or_ids] if isinstance(paths_or_ids, (str, Path, int, np.integer)) else list(paths_or_ids)
        )
        ids: set[int] = set()
        for it in items:
            if isinstance(it, (int, np.integer)) and not isinstance(it, bool):
                ids.update(db.rows_by_id(self.conn, [int(it)]))
            elif isinstance(it, (str, Path)):
                # the key as given (a non-path key, or a row stored before paths were normalised) and the
                # normalised path, which is how add stores files
                for key in {str(it), files.normalise(it)}:
                    ids.update(db.ids_for_key_or_prefix(self.conn, key))
                    ids.update(i for i, _ in db.rows_with_prefix(self.conn, files.frame_prefix(key)))
            else:
                raise ValueError(f"remove() takes ids, paths or folders, got {it!r}")
        if ids:
            self.commit(np.zeros((0, self.dim), np.float32), [], sorted(ids))
        return len(ids)

    # ---- reading ------------------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) stored unit vectors of these ids, in order ("more like this", re-ranking)."""
        return db.vectors_for(self.conn, np.asarray(ids, np.int64), self.dim)

    def search_vectors(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries (Q, D), used as given -> (Q, k') scores and ids, k' = min(k, matching items), best first;
        id -1 pads a row an approximate index could not fill. `allowed`: only these ids (a filter). A huge k
        costs no more than k = len(self)."""
        k = check_k(k)
        if allowed is not None and len(allowed) <= EXACT_FILTER_LIMIT:
            s = q @ self.vectors(allowed).T  # (Q, A): exact over the few rows the filter leaves
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(s, order, 1).astype(np.float32), allowed[order]
        return self._ann.search(q, k, allowed, self.vectors)

    def search_batch(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`search_vectors` with the queries validated and L2-normalised first."""
        return self.search_vectors(unit(as_matrix(vectors, self.dim, "query vectors")), k)

    def filter_ids(self, **filters: Any) -> np.ndarray | None:
        """Ids passing the filters given (see db.filtered_ids for their names); None when no filter is given,
        every row passes."""
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise QueryError(f"unknown filter {sorted(unknown)}; valid: {', '.join(FILTERS)}")
        given = {name: v for name, v in filters.items() if v is not None}
        if not given:
            return None
        if given.get("modality", "image") not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {given['modality']!r}")
        return db.filtered_ids(self.conn, **given)

    def all_ids(self) -> np.ndarray:
        return db.all_ids(self.conn)

    @property
    def generation(self) -> int:
        """The generation (committed transactions) the in-memory index reflects."""
        return self._gen

    def has_keywords(self) -> bool:
        """Is the keyword index usable (a read-only view of an old collection has none until a writer opens
        it once)?"""
        return db.has_keywords(self.conn)

    def search_keywords(
        self, words: list[str], k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows holding any of `words` (keywords.tokens), by BM25: (scores (n,), ids (n,)), n <= k."""
        return db.keyword_search(self.conn, words, check_k(k), allowed)

    def keyword_texts(self, ids: np.ndarray) -> dict[int, str]:
        """id -> the words stored for keyword search (name, caption and metadata words)."""
        return db.keyword_texts(self.conn, ids)

    def word_counts(self, words: list[str]) -> tuple[dict[str, int], int]:
        """Rows holding each word, and the number of rows."""
        return db.documents_with(self.conn, words)

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        """One query's results (k,) -> hits, dropping padding (-1) and rows deleted since the index was read."""
        keep = [(float(s), int(i)) for s, i in zip(scores, ids) if i >= 0]
        rows = db.rows_by_id(self.conn, [i for _, i in keep])
        return [hit_from_row(rows[i], s) for s, i in keep if i in rows]

    def get(self, id: int) -> Hit | None:
        row = db.rows_by_id(self.conn, [int(id)]).get(int(id))
        return None if row is None else hit_from_row(row, 0.0)

    def iter_vectors(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All (ids (n,), vectors (n, D)), a chunk at a time."""
        return db.iter_vectors(self.conn, self.dim)

    def measure_recall(self, k: int = 10, sample: int = 200, seed: int = 0) -> float:
        """recall@k of the index against exact search on `sample` queries that are not stored vectors (a
        stored vector finds itself too easily; see recall.py)."""
        return recall.recall_at_k(
            self.conn, self.dim, self.search_vectors, self.vectors, k=k, sample=sample, seed=seed
        )

    def info(self) -> dict:
        out = {
            "path": str(self.path),
            "vectors": self._ann.ntotal,
            "rows": db.count(self.conn),
            "model": self.identity,
            "dim": self.dim,
            "metric": "inner_product",
            "index": self.kind,
            "index_active": self._ann.kind,
            "generation": self._gen,
            "clipforge_version": self.config.get("clipforge_version"),
            "relevance": self.relevance.to_dict(),
        }
        if self._ann.kind != "flat":
            if self._recall is None or self._recall[0] != self._gen:
                self._recall = (self._gen, self.measure_recall())
            out["recall@10"] = self._recall[1]
        return out
