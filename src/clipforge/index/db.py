"""The SQLite side of a collection: the source of truth for rows and their vectors.

Every row carries its vector (float32 blob) and the generation of the transaction that wrote it, so the FAISS
index can be rebuilt or caught up from here after any crash. One committed transaction = one generation.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from . import keywords

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids are never reused, so a stale index
                                                 -- snapshot can never confuse an old vector with a new row
    key      TEXT,                               -- file path or user key; NULL for bare captions
    caption  TEXT,
    sha256   TEXT,
    size     INTEGER,
    mtime    REAL,
    added    REAL NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    gen      INTEGER NOT NULL,
    vector   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_key ON items(key);
CREATE INDEX IF NOT EXISTS items_sha ON items(sha256);
CREATE INDEX IF NOT EXISTS items_added ON items(added);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO state VALUES ('generation', 0);
"""

ROW_COLUMNS = "id, key, caption, sha256, size, mtime, added, metadata"
RECORD_KEYS = ("path", "key", "caption", "sha256", "size", "mtime", "metadata")
IN_CHUNK = 900  # ids per `IN (...)` query: under SQLite's default limit of 999 bound parameters


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        return _connect_readonly(path)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)  # explicit BEGIN/COMMIT below
    conn.execute("PRAGMA journal_mode=WAL")  # readers see the last commit while a writer works
    conn.execute("PRAGMA synchronous=FULL")  # a batch reported committed survives power loss too
    conn.executescript(SCHEMA)
    ensure_keywords(conn)
    return conn


def generation(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM state WHERE name='generation'").fetchone()[0])


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def _connect_readonly(path: Path) -> sqlite3.Connection:
    uri = Path(path).absolute().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, timeout=30)
    try:
        generation(conn)  # SQLite opens lazily: a reader that cannot work fails here
        return conn
    except sqlite3.OperationalError:
        conn.close()
        wal = Path(f"{path}-wal")
        if Path(f"{path}-shm").exists() or (wal.exists() and wal.stat().st_size):
            raise  # a writer is (or was, and crashed) at work: this is not the case below
    # A WAL database without its -shm file, in a folder this process cannot write (a read-only mount, a
    # folder without write permission), opens only as immutable. With no -wal content either, the database
    # file holds every commit, and no writer is at work (a writer keeps the -shm file while it is open).
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=30)


def count_since(conn: sqlite3.Connection, gen: int) -> int:
    """Rows written by the transactions after generation `gen`."""
    return int(conn.execute("SELECT COUNT(*) FROM items WHERE gen > ?", (gen,)).fetchone()[0])


def all_ids(conn: sqlite3.Connection) -> np.ndarray:
    cur = conn.execute("SELECT id FROM items")
    return np.fromiter((r[0] for r in cur), np.int64)


def vectors_for(conn: sqlite3.Connection, ids: np.ndarray, dim: int) -> np.ndarray:
    """Vectors (n, D) of `ids`, in the order given. Missing ids raise KeyError."""
    idl = [int(i) for i in ids]
    found: dict[int, bytes] = {
        r[0]: r[1] for r in _rows_in(conn, "SELECT id, vector FROM items WHERE id", idl)
    }
    out = np.empty((len(idl), dim), np.float32)
    for r, i in enumerate(idl):
        out[r] = np.frombuffer(found[i], np.float32)
    return out


def iter_vectors(
    conn: sqlite3.Connection, dim: int, chunk: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All (ids (n,), vectors (n, D)) in id order, a chunk at a time so 1M rows never sit in Python objects."""
    last = -1
    while True:
        rows = conn.execute(
            "SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
        ).fetchall()
        if not rows:
            return
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
        yield ids, vecs
        last = int(ids[-1])


def lookup(conn: sqlite3.Connection, key: str) -> list[tuple[int, str | None]]:
    """(id, sha256) of every row stored under `key`."""
    return conn.execute("SELECT id, sha256 FROM items WHERE key=?", (key,)).fetchall()


def caption_id(conn: sqlite3.Connection, sha: str) -> int | None:
    """The id of a bare caption (a row with no key) of this text hash, if one is stored."""
    row = conn.execute("SELECT id FROM items WHERE key IS NULL AND sha256=?", (sha,)).fetchone()
    return None if row is None else int(row[0])


def keys_under(conn: sqlite3.Connection, folder: str) -> dict[str, list[int]]:
    """key -> ids of the rows whose key lies under the folder `folder/`."""
    return keys_with_prefix(conn, folder.rstrip("/") + "/")


def keys_with_prefix(conn: sqlite3.Connection, prefix: str) -> dict[str, list[int]]:
    """key -> ids of the rows whose key starts with `prefix`."""
    out: dict[str, list[int]] = {}
    for id_, key in _with_prefix(conn, "id, key", prefix):
        out.setdefault(key, []).append(int(id_))
    return out


def rows_with_prefix(conn: sqlite3.Connection, prefix: str) -> list[tuple[int, str | None]]:
    """(id, sha256) of every row whose key starts with `prefix`."""
    return _with_prefix(conn, "id, sha256", prefix).fetchall()


def _with_prefix(conn: sqlite3.Connection, columns: str, prefix: str) -> sqlite3.Cursor:
    """`columns` of the rows whose key starts with `prefix`: a range query, so the key index is used and '%'
    or '_' in a file name are not wildcards."""
    upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    return conn.execute(f"SELECT {columns} FROM items WHERE key >= ? AND key < ?", (prefix, upper))


def write_batch(
    conn: sqlite3.Connection, vectors: np.ndarray, records: list[dict], drop: Iterable[int]
) -> tuple[int, list[int]]:
    """One transaction: delete `drop`, insert the rows (and their keyword entries). -> (generation, ids)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        delete_ids(conn, drop)
        gen = bump_generation(conn)
        ids = insert_batch(conn, vectors, records, gen)
        _set_state(conn, "keywords_generation", gen)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite has already rolled back after some failures (full disk)
            conn.execute("ROLLBACK")
        raise
    return gen, ids


def insert_batch(
    conn: sqlite3.Connection, vectors: np.ndarray, records: list[dict], gen: int, now: float | None = None
) -> list[int]:
    now = time.time() if now is None else now
    ids = []
    for vec, rec in zip(vectors, records):
        key = rec.get("path", rec.get("key"))
        cur = conn.execute(
            "INSERT INTO items (key, caption, sha256, size, mtime, added, metadata, gen, vector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                None if key is None else str(key),
                rec.get("caption"),
                rec.get("sha256"),
                rec.get("size"),
                rec.get("mtime"),
                float(rec.get("added", now)),
                json.dumps(rec.get("metadata") or {}, sort_keys=True),
                gen,
                np.ascontiguousarray(vec, np.float32).tobytes(),
            ),
        )
        ids.append(int(cur.lastrowid))
        _insert_keywords(conn, ids[-1], key, rec.get("caption"), rec.get("metadata") or {})
    return ids


def delete_ids(conn: sqlite3.Connection, ids: Iterable[int]) -> None:
    ids = [(int(i),) for i in ids]
    conn.executemany("DELETE FROM items WHERE id=?", ids)
    conn.executemany("DELETE FROM items_fts WHERE rowid=?", ids)


def bump_generation(conn: sqlite3.Connection) -> int:
    conn.execute("UPDATE state SET value = value + 1 WHERE name='generation'")
    return generation(conn)


def ids_for_key_or_prefix(conn: sqlite3.Connection, key: str) -> list[int]:
    """Rows whose key is `key` or lies under the folder `key/`. A range query keeps the key index usable
    (LIKE would treat '%' and '_' in file names as wildcards)."""
    prefix = key.rstrip("/") + "/"
    upper = prefix[:-1] + chr(ord("/") + 1)
    rows = conn.execute(
        "SELECT id FROM items WHERE key = ? OR (key >= ? AND key < ?)", (key, prefix, upper)
    ).fetchall()
    return [r[0] for r in rows]


def filtered_ids(
    conn: sqlite3.Connection,
    path_prefix: str | None = None,
    added_after: float | None = None,
    added_before: float | None = None,
    modality: str | None = None,
    after: tuple[str, float] | None = None,
    before: tuple[str, float] | None = None,
    camera: str | None = None,
) -> np.ndarray:
    """Ids of the rows passing every filter given. `after`/`before` bound an item's date: its metadata
    "taken_at" (ISO 8601, compared as written: a camera's local time) where it has one, else the time it was
    added; each bound is (ISO text, Unix time). `camera`: "camera" metadata containing it, any case."""
    where, args = [], []
    if modality is not None:  # "image": rows with a file (a key); "text": bare captions (no key)
        where.append("key IS NOT NULL" if modality == "image" else "key IS NULL")
    if path_prefix is not None:
        upper = path_prefix[:-1] + chr(ord(path_prefix[-1]) + 1) if path_prefix else None
        where.append("key >= ?" + (" AND key < ?" if upper else ""))
        args += [path_prefix] + ([upper] if upper else [])
    if added_after is not None:
        where.append("added > ?")
        args.append(added_after)
    if added_before is not None:
        where.append("added < ?")
        args.append(added_before)
    taken = "json_extract(metadata, '$.taken_at')"
    for bound, op in ((after, ">"), (before, "<")):
        if bound is not None:
            where.append(f"(CASE WHEN {taken} IS NOT NULL THEN {taken} {op} ? ELSE added {op} ? END)")
            args += [bound[0], bound[1]]
    if camera is not None:
        where.append("instr(lower(json_extract(metadata, '$.camera')), lower(?)) > 0")
        args.append(camera)
    cur = conn.execute(f"SELECT id FROM items WHERE {' AND '.join(where) or '1'}", args)
    return np.fromiter((r[0] for r in cur), np.int64)


def rows_by_id(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, tuple]:
    return {r[0]: r for r in _rows_in(conn, f"SELECT {ROW_COLUMNS} FROM items WHERE id", ids)}


def _rows_in(conn: sqlite3.Connection, select: str, ids: Iterable[int]) -> Iterator[tuple]:
    """The rows of `select` (a query ending in the id column to match) `IN` the ids, asked in chunks that stay
    under SQLite's bound-parameter limit."""
    idl = [int(i) for i in ids]
    for start in range(0, len(idl), IN_CHUNK):
        chunk = idl[start : start + IN_CHUNK]
        yield from conn.execute(f"{select} IN ({','.join('?' * len(chunk))})", chunk)


# ---- keyword search (FTS5) ------------------------------------------------------------------------------
# A separate full-text table whose rowid is the item's id, written in the same transaction as the item, so a
# crash never leaves the two apart. "keywords_generation" says which generation it reflects: a collection
# written by a version without it (or before it existed) is re-indexed on its next open for writing.
FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5(name, caption, meta, tokenize='unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS items_fts_terms USING fts5vocab(items_fts, 'row');
"""
FTS_WEIGHTS = (2.0, 1.0, 0.5)  # BM25 column weights: a word of the file name counts most


def _set_state(conn: sqlite3.Connection, name: str, value: int) -> None:
    conn.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (name, value))


def _state(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT value FROM state WHERE name=?", (name,)).fetchone()
    return None if row is None else int(row[0])


def has_keywords(conn: sqlite3.Connection) -> bool:
    """Is the keyword index there and up to date (False for an old collection opened read-only)?"""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name='items_fts'").fetchone()
    return exists is not None and _state(conn, "keywords_generation") == generation(conn)


def _insert_keywords(
    conn: sqlite3.Connection, id_: int, key: str | None, caption: str | None, meta: dict
) -> None:
    conn.execute(
        "INSERT INTO items_fts (rowid, name, caption, meta) VALUES (?, ?, ?, ?)",
        (
            id_,
            keywords.name_text(key),
            " ".join(keywords.tokens(caption or "")),
            keywords.metadata_text(meta),
        ),
    )


def ensure_keywords(conn: sqlite3.Connection) -> None:
    """Create the keyword index, or rebuild it from the rows when it lags (an older writer), in one
    transaction."""
    if has_keywords(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in FTS_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("DELETE FROM items_fts")
        for id_, key, caption, meta in conn.execute(
            "SELECT id, key, caption, metadata FROM items"
        ).fetchall():
            _insert_keywords(conn, id_, key, caption, json.loads(meta))
        _set_state(conn, "keywords_generation", generation(conn))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def keyword_search(
    conn: sqlite3.Connection, words: list[str], k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rows holding any of `words`, best BM25 first: (scores (n,), ids (n,)), n <= k; a higher score is a
    better match (FTS5's bm25() is negated). `allowed`: only these ids."""
    if not words:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    w = ", ".join(str(x) for x in FTS_WEIGHTS)
    sql = f"SELECT rowid, -bm25(items_fts, {w}) AS s FROM items_fts WHERE items_fts MATCH ? ORDER BY s DESC"
    args: list = [keywords.match_expression(words)]
    if allowed is None:
        rows = conn.execute(sql + " LIMIT ?", (*args, k)).fetchall()
    else:
        ok = set(int(i) for i in allowed)
        rows = []
        for rid, s in conn.execute(sql, args):
            if rid in ok:
                rows.append((rid, s))
                if len(rows) == k:
                    break
    return np.array([r[1] for r in rows], np.float32), np.array([r[0] for r in rows], np.int64)


def keyword_texts(conn: sqlite3.Connection, ids: Iterable[int]) -> dict[int, str]:
    """id -> the words stored for it (name, caption and metadata words, space-separated)."""
    select = "SELECT rowid, name, caption, meta FROM items_fts WHERE rowid"
    return {r[0]: " ".join(r[1:]) for r in _rows_in(conn, select, ids)}


def documents_with(conn: sqlite3.Connection, words: list[str]) -> tuple[dict[str, int], int]:
    """How many rows hold each word, and how many rows there are (for word weights, IDF)."""
    uniq = list(dict.fromkeys(words))
    found = (
        dict(
            conn.execute(
                f"SELECT term, doc FROM items_fts_terms WHERE term IN ({','.join('?' * len(uniq))})", uniq
            ).fetchall()
        )
        if uniq
        else {}
    )
    return {w: int(found.get(w, 0)) for w in uniq}, count(conn)
