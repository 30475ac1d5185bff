"""A collection under stress: absurd k, a full disk, a read-only folder, a killed add, and paths spelled in
several ways. Whatever happens, the error is named and true (what was committed is said and stays stored),
no temp file is left behind, and nothing is written outside the collection folder."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_model
from memlimit import GB, address_space_cap
from PIL import Image
from test_index_cli import fail, run
from test_index_store import FakeEncoder, agree, clustered, solid

import clipforge.index.db as db
import clipforge.index.store as store
from clipforge.encoder import Encoder
from clipforge.index import Collection, QueryError, WriteError, ann

SRC = Path(__file__).resolve().parents[1] / "src"
HUGE_K = 1_000_000_000  # k x (4 + 8) bytes of results: 12 GB if anything sized an array by it


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ k


@pytest.fixture
def mixed(tmp_path, model) -> tuple[Collection, Encoder]:
    """Images and captions (for image-to-text) in a flat collection, with the tiny model."""
    enc = Encoder.load(model)
    c = Collection.create(tmp_path / "mixed", identity=enc.identity, dim=enc.dim)
    c.add(write_images(tmp_path / "img", 12), enc, workers=0)
    c.add_texts(["a red circle", "a blue square", "green"], enc)
    yield c, enc
    c.close()


def test_huge_k_is_clamped_on_every_search_path(mixed, tmp_path):
    mixed, enc = mixed
    n = len(mixed)
    img = tmp_path / "img" / "003.png"
    with address_space_cap(2 * GB):  # before: MemoryError (12 GB of results), unbounded the OOM killer
        assert len(mixed.search(text="a red circle", k=HUGE_K, encoder=enc)) == n
        assert len(mixed.search(image=img, k=HUGE_K, encoder=enc)) == n
        both = mixed.search(text="red", image=img, negative="blue", k=HUGE_K, encoder=enc)
        assert len(both) == n and len({h.id for h in both}) == n
        under = mixed.search(text="red", k=HUGE_K, encoder=enc, path_prefix=str(tmp_path / "img"))
        assert len(under) == 12 and all(h.path for h in under)  # exact path over the filtered rows
        s, i = mixed.search_batch(mixed.vectors(np.array([under[0].id])), HUGE_K)
        assert s.shape == i.shape == (1, n) and i[0, 0] == under[0].id
        assert mixed.measure_recall(k=HUGE_K) == 1.0
        assert mixed.dedup(threshold=0.9999, neighbours=HUGE_K) == []


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_ann_wrappers_clamp_k_to_what_they_hold(kind):
    dim = 16
    x = clustered(1000, dim, 8)
    vi = ann.VectorIndex.build(kind, dim, x, np.arange(1000, 2000))
    vi.remove(np.arange(1000, 1010))  # HNSW keeps these as tombstones: 990 live
    with address_space_cap(2 * GB):
        s, i = vi.search(x[:2], HUGE_K, fetch=lambda ids: x[ids - 1000])
        assert s.shape == i.shape == (2, 990)
        s, i = vi.search(x[:2], HUGE_K, allowed=np.arange(1500, 1520), fetch=lambda ids: x[ids - 1000])
        assert i.shape == (2, 20) and set(i[i >= 0].tolist()) <= set(range(1500, 1520))
    empty = ann.VectorIndex.build("flat", dim, x[:0], np.zeros(0, np.int64))
    assert empty.search(x[:3], 5)[1].shape == (3, 0)
    with pytest.raises(QueryError, match="k must be a positive integer, got 0"):
        vi.search(x[:1], 0)


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "10", None])
def test_k_that_is_not_a_positive_integer_is_a_named_error(mixed, k):
    mixed, enc = mixed
    with pytest.raises(QueryError, match=f"k must be a positive integer, got {k!r}"):
        mixed.search(text="red", k=k, encoder=enc)
    with pytest.raises(QueryError, match="k must be"):
        mixed.search_batch(np.ones((1, enc.dim)), k)
    with pytest.raises(QueryError, match="k must be"):
        mixed.measure_recall(k=k)
    with pytest.raises(QueryError, match="neighbours must be"):
        mixed.dedup(neighbours=k)


def test_cli_search_with_a_huge_or_bad_k(capsys, model, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    run(capsys, "index", "add", col, write_images(tmp_path / "img", 5), "--workers", "0", "--json")
    with address_space_cap(2 * GB):  # before: the CLI was OOM-killed at 23 GB on a 4,000-item collection
        assert len(run(capsys, "search", col, "red", "--k", HUGE_K, "--json")["hits"]) == 5
    assert "k must be a positive integer, got 0" in fail(capsys, "search", col, "red", "--k", "0")


# ---------------------------------------------------------------------------------------- full disk


class _FullFile:
    """A file on a disk with `room` bytes left: it takes them, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        b = memoryview(data).cast("B")
        if len(b) > self.room:
            self.f.write(b[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self) -> _FullFile:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def disk_full_for(monkeypatch, suffix: str, room: int = 64) -> None:
    """Files opened for writing whose name ends with `suffix` hit ENOSPC after `room` bytes."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(suffix) and "w" in mode:
            return _FullFile(f, room)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


def database_full_after(monkeypatch, pages: int) -> None:
    """SQLite answers SQLITE_FULL ("database or disk is full") once the file would grow by `pages` pages."""
    real_connect = db.connect

    def connect(path, readonly):
        conn = real_connect(path, readonly)
        if not readonly:
            now = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {now + pages}")
        return conn

    monkeypatch.setattr(db, "connect", connect)


def test_snapshot_on_a_full_disk_warns_keeps_the_rows_and_leaves_no_temp_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(store, "SNAPSHOT_EVERY", 1)  # every batch writes a snapshot
    path = tmp_path / "c"
    c = Collection.create(path, identity={"fingerprint": "f", "dim": 16}, dim=16)
    disk_full_for(monkeypatch, ".faiss.tmp")
    x = clustered(20, 16, 3)
    ids = c.add_vectors(x[:10], [{"key": f"k{i}"} for i in range(10)])  # before: OSError after the commit
    ids += c.add_vectors(x[10:], [{"key": f"k{i}"} for i in range(10, 20)])
    assert c.remove(ids[:2]) == 2
    assert "No space left on device" in caplog.text and "next open rebuilds the index" in caplog.text
    assert temp_files(path) == [] and not list(path.glob("*.faiss"))  # before: a half-written .faiss.tmp
    with pytest.raises(WriteError, match=r"index\.flat\.\d+\.faiss: No space left on device"):
        c.save()  # asked for explicitly: the failure is the answer
    c.close()  # only warns
    assert temp_files(path) == []
    monkeypatch.setattr(builtins, "open", open)
    with Collection.open(path) as c:
        assert c.info()["rows"] == 18
        agree(c)
        assert c.search(vector=x[5], k=1)[0].id == ids[5]


def test_cli_remove_reports_a_committed_delete_although_the_snapshot_failed(capsys, tmp_path, monkeypatch):
    path = tmp_path / "c"
    with Collection.create(path, identity={"fingerprint": "f", "dim": 16}, dim=16) as c:
        c.add_vectors(clustered(5, 16, 2), [{"key": f"/data/{i}.png"} for i in range(5)])
    disk_full_for(monkeypatch, ".faiss.tmp")
    out = run(capsys, "index", "remove", path, "/data/3.png", "--json")  # before: OSError from close()
    assert out["removed"] == 1 and out["rows"] == out["vectors"] == 4
    assert temp_files(path) == []
    monkeypatch.setattr(builtins, "open", open)
    with Collection.open(path, readonly=True) as c:
        assert c.info()["rows"] == 4 and len(c) == 4


def test_database_full_during_add_names_the_committed_count(tmp_path, monkeypatch):
    images = write_images(tmp_path / "img", 30)
    enc = FakeEncoder(dim=512)  # 2 KB vectors: the database grows a page per item or two
    path = tmp_path / "c"
    Collection.create(path, identity=enc.identity, dim=enc.dim).close()
    database_full_after(monkeypatch, pages=8)
    with Collection.open(path) as c:
        with pytest.raises(WriteError, match="database or disk is full") as info:
            c.add(images, enc, batch_size=2)  # before: sqlite3.OperationalError, no count
        stored = c.info()["rows"]
        assert 0 < stored < 30 and stored % 2 == 0  # whole batches only
        assert info.value.committed == stored
        assert f"{stored} items were committed before the failure" in str(info.value)
        agree(c)


def test_cli_add_on_a_full_disk_says_what_is_stored(capsys, model, tmp_path, monkeypatch):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    images = write_images(tmp_path / "img", 40)
    real_connect = db.connect
    database_full_after(monkeypatch, pages=4)
    err = fail(capsys, "index", "add", col, images, "--batch-size", "4", "--workers", "0")
    monkeypatch.setattr(db, "connect", real_connect)
    with Collection.open(col, readonly=True) as c:
        stored = c.info()["rows"]
    assert 0 < stored < 40
    assert "database or disk is full" in err and f"{stored} items were committed before the failure" in err
    # once there is room again, the same command adds the rest
    again = run(capsys, "index", "add", col, images, "--workers", "0", "--json")
    assert again["unchanged"] == stored and again["added"] == 40 - stored


def test_cli_add_of_a_manifest_on_a_full_disk(capsys, model, tmp_path, monkeypatch):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    write_images(tmp_path / "img", 3)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"img/{i:03d}.png"}) + "\n" for i in range(3)))
    disk_full_for(monkeypatch, ".npy.tmp")
    err = fail(capsys, "index", "add", col, manifest, "--workers", "0")  # before: an OSError traceback
    assert "img_emb_0.npy: No space left on device; 0 items were committed" in err
    assert temp_files(col) == [] and list((col / "scratch").glob("*")) == []


def test_stale_temp_files_and_scratch_are_removed_when_opened_for_writing(tmp_path):
    path = tmp_path / "c"
    Collection.create(path, identity={"fingerprint": "f", "dim": 4}, dim=4).close()
    leftovers = [path / "index.flat.7.faiss.tmp", path / "collection.json.tmp", path / "scratch" / "a" / "x"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    Collection.open(path, readonly=True).close()
    assert all(p.exists() for p in leftovers)  # a reader may not judge a writer's files
    Collection.open(path).close()
    assert not any(p.exists() for p in leftovers) and not (path / "scratch").exists()


# ------------------------------------------------------------------------------------------- paths


def test_paths_are_normalised_for_add_remove_and_lookups(tmp_path, monkeypatch):
    enc = FakeEncoder()
    images = tmp_path / "images"
    solid(images / "x.png", (200, 0, 0))
    solid(images / "sub" / "y.png", (0, 200, 0))
    monkeypatch.chdir(tmp_path)
    with Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim) as c:
        assert c.add(["images"], enc).added == [str(images / "x.png"), str(images / "sub" / "y.png")]
        again = c.add(["images/../images/x.png", "./images//sub/./y.png"], enc)
        assert again.unchanged == [str(images / "x.png"), str(images / "sub" / "y.png")]  # before: 2 new rows
        assert c.info()["rows"] == 2
        assert c.remove("images/../images/x.png") == 1  # before: missed the stored row
        assert c.remove("images/sub/") == 1 and c.info()["rows"] == 0


def test_manifest_paths_are_normalised(capsys, model, tmp_path, monkeypatch):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    write_images(tmp_path / "img", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"image": "img/../img/000.png"}) + "\n" + json.dumps({"image": "./img/001.png"}) + "\n"
    )
    assert run(capsys, "index", "add", col, manifest, "--workers", "0", "--json")["added"] == 2
    assert run(capsys, "index", "add", col, tmp_path / "img", "--workers", "0", "--json")["unchanged"] == 2
    with Collection.open(col, readonly=True) as c:
        keys = sorted(r[0] for r in c.conn.execute("SELECT key FROM items"))
    assert keys == [str(tmp_path / "img" / "000.png"), str(tmp_path / "img" / "001.png")]
    monkeypatch.chdir(tmp_path)
    hits = run(capsys, "search", col, "a shape", "--path-prefix", "./img/../img/", "--json")["hits"]
    assert sorted(h["path"] for h in hits) == keys  # before: the prefix was compared as typed, so no hits


# -------------------------------------------------------------------------- read-only and killed adds

READONLY_CHILD = r"""
import json, sys
from clipforge.cli import main
from clipforge.index import Collection
col, images, model = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
try:
    Collection.open(col)
    out["open"] = "opened"
except Exception as e:
    out["open"] = f"{type(e).__name__}: {e}"
out["add"] = main(["index", "add", col, images, "--workers", "0"])
out["remove"] = main(["index", "remove", col, images])
out["search"] = main(["search", col, "red", "--k", "2", "--json"])
out["create"] = main(["index", "create", col + "/inner", "--model", model])
print("RESULT " + json.dumps(out), flush=True)
"""


def run_on_readonly_folder(col: Path, images: Path, model: Path) -> tuple[dict, str]:
    """Run READONLY_CHILD with `col` read-only: by permissions, or (as root, whom permissions do not stop)
    on a read-only bind mount in a user namespace."""
    cmd = [sys.executable, "-c", READONLY_CHILD, str(col), str(images), str(model)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode:
            pytest.skip("running as root without user namespaces: cannot make a folder read-only")
        mount = 'mount --bind -o ro "$0" "$0" && exec "$@"'
        cmd = ["unshare", "-rm", "sh", "-c", mount, str(col), *cmd]
    modes = {p: p.stat().st_mode for p in [col, *col.iterdir()]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT ") :]), proc.stderr


def test_writes_to_a_read_only_collection_are_named_errors(capsys, model, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    images = write_images(tmp_path / "img", 3)
    run(capsys, "index", "add", col, images, "--workers", "0", "--json")
    out, err = run_on_readonly_folder(col, images, model)
    assert out["open"].startswith("WriteError: cannot open collection") and "readonly=True" in out["open"]
    assert out["add"] == 2 and out["remove"] == 2 and out["search"] == 0 and out["create"] == 2, err
    assert "Traceback" not in err  # before: OSError tracebacks from the lock file
    assert err.count("cannot open collection") == 2 and "cannot write collection" in err
    with Collection.open(col, readonly=True) as c:
        assert c.info()["rows"] == 3


KILLED_ADD = [sys.executable, "-m", "clipforge", "index", "add"]


def test_an_add_killed_mid_way_leaves_nothing_outside_the_collection(capsys, model, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    write_images(tmp_path / "img", 4)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"img/{i:03d}.png"}) + "\n" for i in range(4)))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", TMPDIR=str(tmpdir))
    crashing = [sys.executable, str(Path(__file__).parent / "crashpoints.py"), "before_commit"]
    proc = subprocess.run(  # dies (os._exit: no cleanup runs) after embedding, before the first commit
        [*crashing, *KILLED_ADD[1:], str(col), str(manifest), "--workers", "0"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 77, proc.stderr[-2000:]
    assert list(tmpdir.iterdir()) == []  # before: a clipforge-add-* folder of embeddings, leaked for good
    assert any((col / "scratch").iterdir())  # the dead add's embeddings, inside the collection...
    with Collection.open(col) as c:  # ...until the next writer opens it
        assert c.info()["rows"] == 0
    assert not (col / "scratch").exists()
    assert run(capsys, "index", "add", col, manifest, "--workers", "0", "--json")["added"] == 4
