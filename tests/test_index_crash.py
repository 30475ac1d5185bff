"""Kill a process in the middle of `Collection.add` / `remove` and check that the collection survives.

A child process adds folders of images batch by batch, printing "committed <folder>" after each `add` returns
and "removed <folder>" after each `remove`. It is killed either at a deliberate point (the
crashpoints.py wrappers call os._exit there) or by SIGKILL after a random delay. Afterwards the
collection must open, its index and database must agree, every reported folder must be fully present (or
fully gone, if reported removed; all or nothing if killed while removing), and no batch may be half-written.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.index import Collection

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
FOLDERS, PER_FOLDER, BATCH = 12, 8, 4

CHILD = r"""
import sys
import numpy as np
from PIL import Image
import clipforge.index.store as store
from clipforge.index import Collection
if sys.argv[4]:
    import crashpoints
    crashpoints.install(sys.argv[4])

class Enc:  # mean colour -> fixed projection; enough for storage tests
    identity = {"model": "crash-fake", "fingerprint": "sha256:crash", "dim": 16}
    dim = 16
    proj = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    def embed_images(self, images):
        f = np.array([np.r_[np.asarray(im.convert("RGB"), np.float32).mean((0, 1)) / 255 - 0.5, 0.1] for im in images])
        x = f.astype(np.float32) @ self.proj
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    def embed_texts(self, texts):
        raise NotImplementedError

store.SNAPSHOT_EVERY = 2  # snapshot often, so kills land inside snapshot writes too
root, coll_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Collection.open(coll_path)
print("opened", flush=True)
if sys.argv[5:] == ["sync"]:
    c.sync(root, Enc(), batch_size=BATCH_SIZE)
    print("synced", flush=True)
for i in range(n):
    print(f"adding {i}", flush=True)
    c.add([f"{root}/f{i:02d}"], Enc(), batch_size=BATCH_SIZE)
    print(f"committed {i}", flush=True)
    if i % 4 == 3:
        print(f"removing {i - 2}", flush=True)
        c.remove(f"{root}/f{i - 2:02d}")
        print(f"removed {i - 2}", flush=True)
c.close()
print("closed", flush=True)
""".replace("BATCH_SIZE", str(BATCH))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for f in range(FOLDERS):
        (root / f"f{f:02d}").mkdir()
        for j in range(PER_FOLDER):
            a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / f"f{f:02d}" / f"{j}.png")
    return root


def run_child(
    root: Path, coll: Path, crash_at: str | None, kill_after: float | None, n: int = FOLDERS, *extra: str
) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), str(coll), str(n), crash_at or "", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if kill_after is not None:
        # count from "opened" so the delay lands inside the adds, not in interpreter start-up
        assert proc.stdout.readline().strip() == "opened"
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    lines = ([] if kill_after is None else ["opened"]) + out.splitlines()
    if crash_at:
        assert proc.returncode == 77, err
    return lines


def check(coll_path: Path, root: Path, lines: list[str], state: dict[int, str]) -> None:
    for line in lines:
        word, _, num = line.partition(" ")
        if word in ("adding", "committed", "removed", "removing"):
            state[int(num)] = word
    with Collection.open(coll_path) as c:
        info = c.info()
        assert info["vectors"] == info["rows"]
        in_db = np.sort(np.fromiter((r[0] for r in c.conn.execute("SELECT id FROM items")), np.int64))
        assert np.array_equal(np.sort(c._ann.live_ids()), in_db)
        fts = np.sort(np.fromiter((r[0] for r in c.conn.execute("SELECT rowid FROM items_fts")), np.int64))
        assert np.array_equal(fts, in_db) and c.has_keywords()  # keyword rows commit with their items
        keys = [r[0] for r in c.conn.execute("SELECT key FROM items")]
        assert len(keys) == len(set(keys))  # a file is never stored twice
        per_folder: dict[str, int] = {}
        for k in keys:
            per_folder[Path(k).parent.name] = per_folder.get(Path(k).parent.name, 0) + 1
        for f, word in state.items():
            # a removal cut short is one transaction: all of the folder is there, or none; an add cut short
            # (a removed folder added again, killed between its commit and its "committed" line) left whole
            # batches of it
            expected = {
                "adding": set(range(0, PER_FOLDER + 1, BATCH)),
                "committed": {PER_FOLDER},
                "removed": {0},
                "removing": {0, PER_FOLDER},
            }[word]
            assert per_folder.get(f"f{f:02d}", 0) in expected, (f, word, per_folder)
        assert all(v % BATCH == 0 for v in per_folder.values()), per_folder  # whole batches only
        # the survivors are searchable: each stored vector finds itself first
        s, ids = c.search_batch(c.vectors(in_db[:20]), 1)
        assert np.array_equal(ids[:, 0], in_db[:20]) or np.allclose(s[:, 0], 1.0, atol=1e-5)


def test_killed_add_leaves_a_consistent_collection(tmp_path, image_root):
    coll = tmp_path / "coll"
    Collection.create(coll, identity={"fingerprint": "sha256:crash", "dim": 16}, dim=16).close()
    state: dict[int, str] = {}
    deliberate = [
        "before_commit:3",
        "after_commit:2",
        "during_snapshot:1",
        "after_commit:9",
        "during_snapshot:3",
    ]
    for point in deliberate:
        check(coll, image_root, run_child(image_root, coll, point, None), state)
    rng = random.Random(0)
    for _ in range(3):
        check(coll, image_root, run_child(image_root, coll, None, rng.uniform(0.02, 0.4)), state)
    lines = run_child(image_root, coll, None, None)  # and finally a clean run to the end
    assert lines[-1] == "closed"
    check(coll, image_root, lines, state)
    assert len(state) == FOLDERS


def write_folder(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(folder / f"{j}.png")


def test_a_killed_sync_leaves_a_consistent_collection_and_a_rerun_finishes_it(tmp_path):
    root, coll = tmp_path / "lib", tmp_path / "coll"
    for f in range(3):
        write_folder(root / f"f{f:02d}", PER_FOLDER, seed=f)
    Collection.create(coll, identity={"fingerprint": "sha256:crash", "dim": 16}, dim=16).close()
    assert run_child(root, coll, None, None, 3)[-1] == "closed"
    shutil.rmtree(root / "f00")  # gone
    write_folder(root / "f01", PER_FOLDER // 2, seed=10)  # half of f01 changed
    write_folder(root / "f03", PER_FOLDER, seed=11)  # new
    # after the removals' transaction; inside the adds; during a snapshot
    for point in ("after_commit:1", "before_commit:2", "during_snapshot:1"):
        run_child(root, coll, point, None, 0, "sync")
        check(coll, root, [], {})  # opens, index and rows agree, no key twice, whole batches
    assert run_child(root, coll, None, None, 0, "sync")[-2:] == ["synced", "closed"]
    on_disk = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.png")}
    with Collection.open(coll, readonly=True) as c:
        stored = dict(c.conn.execute("SELECT key, sha256 FROM items"))
    assert stored == on_disk
