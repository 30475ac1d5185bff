"""Collection: storage, search against brute force, filters, query algebra, updates, approximate recall."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.index import Collection, CollectionError, ModelMismatchError, ann

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


class FakeEncoder:
    """Deterministic stand-in for a CLIP model on 7 features: centred mean colour, colour spread and a bias.

    A solid image and the name of its colour map to the same feature, hence the same unit vector.
    """

    def __init__(self, dim: int = 32, fingerprint: str = "sha256:fake-0", seed: int = 0) -> None:
        self.dim = dim
        self.identity = {"model": "fake-colour", "fingerprint": fingerprint, "dim": dim}
        self.proj = np.random.default_rng(seed).standard_normal((7, dim)).astype(np.float32)

    def _out(self, feats: np.ndarray) -> np.ndarray:
        x = feats.astype(np.float32) @ self.proj  # (N, 7) @ (7, D)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed_images(self, images) -> np.ndarray:
        feats = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.open(io.BytesIO(im) if isinstance(im, bytes) else im)
            a = np.asarray(im.convert("RGB"), np.float32).reshape(-1, 3) / 255.0
            feats.append(np.concatenate([a.mean(0) - 0.5, a.std(0), [0.1]]))
        return self._out(np.array(feats))

    def embed_texts(self, texts) -> np.ndarray:
        feats = []
        for t in texts:
            f = np.zeros(7)
            for w in t.lower().split():
                if w in COLOURS:
                    f += np.concatenate([np.array(COLOURS[w]) / 255.0 - 0.5, [0, 0, 0], [0.1]])
                else:  # unknown words: a fixed pseudo-random direction per word
                    seed = int(hashlib.sha256(w.encode()).hexdigest()[:8], 16)
                    f += 0.3 * np.random.default_rng(seed).standard_normal(7)
            feats.append(f)
        return self._out(np.array(feats))


def clustered(n: int, dim: int, clusters: int, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors around `clusters` random centres: the shape of real embeddings, unlike iid noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def solid(path: Path, rgb: tuple[int, int, int], size: int = 8, noise: int = 0, seed: int = 0) -> Path:
    a = np.full((size, size, 3), rgb, np.int16)
    if noise:
        a += np.random.default_rng(seed).integers(-noise, noise + 1, a.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
    return path


def brute_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.sort(q @ x.T, axis=1)[:, ::-1][:, :k]  # (Q, k) best scores


def assert_same_topk(x: np.ndarray, ids: np.ndarray, q, got_s, got_i, k: int) -> None:
    """Same scores as brute force, and every returned id really has its score (ties may reorder)."""
    ref = brute_topk(x, q, k)
    np.testing.assert_allclose(got_s, ref, atol=1e-5)
    row_of = {int(i): r for r, i in enumerate(ids)}
    for qi in range(len(q)):
        true = x[[row_of[int(i)] for i in got_i[qi]]] @ q[qi]
        np.testing.assert_allclose(true, got_s[qi], atol=1e-5)
        assert len(set(got_i[qi].tolist())) == k


@pytest.fixture
def enc() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def coll(tmp_path, enc):
    c = Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim)
    yield c
    c.close()


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "img"
    for name, rgb in COLOURS.items():
        solid(root / "a" / f"{name}.png", rgb)
    solid(root / "b" / "dark_red.png", (120, 0, 0))
    solid(root / "b" / "deep" / "navy.jpg", (0, 0, 110))
    return root


def agree(c: Collection) -> None:
    """The index holds exactly the database's ids."""
    in_db = np.sort(np.fromiter((r[0] for r in c.conn.execute("SELECT id FROM items")), np.int64))
    assert np.array_equal(np.sort(c._ann.live_ids()), in_db)
    assert c.info()["vectors"] == c.info()["rows"] == len(in_db)


def test_search_equals_brute_force(coll):
    x = clustered(600, coll.dim, 12)
    ids = np.array(coll.add_vectors(x[:300], [{"key": f"k{i}"} for i in range(300)]))
    ids = np.concatenate([ids, coll.add_vectors(x[300:], [{"key": f"k{i}"} for i in range(300, 600)])])
    q = clustered(25, coll.dim, 12, seed=1)
    s, i = coll.search_batch(q, 10)
    assert_same_topk(x, ids, q, s, i, 10)
    hits = coll.search(vector=q[3], k=5)
    np.testing.assert_allclose([h.score for h in hits], s[3, :5], atol=1e-5)
    assert hits[0].path == f"k{int(np.flatnonzero(ids == i[3, 0])[0])}"
    s, i = coll.search_batch(q[:2], 1000)  # k beyond size: clamped to it, not padded
    assert i.shape == s.shape == (2, 600) and (i >= 0).all() and len(coll.search(vector=q[0], k=1000)) == 600


def test_add_images_and_text_query(coll, enc, images, tmp_path):
    (images / "a" / "notes.txt").write_text("not an image")
    (images / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = coll.add([images, tmp_path / "nope.png"], enc, batch_size=3)
    assert len(r.added) == 8 and r.skipped == [str(images / "a" / "notes.txt")]
    failed = dict(r.failed)
    assert "cannot decode image" in failed[str(images / "a" / "broken.png")]
    assert failed[str(tmp_path / "nope.png")] == "file not found"
    top = coll.search(text="red", encoder=enc, k=3)
    assert Path(top[0].path).name == "red.png" and top[0].score == pytest.approx(1.0, abs=1e-5)
    assert Path(coll.search(text="blue", encoder=enc, k=1)[0].path).name == "blue.png"
    hit = coll.get(top[0].id)
    assert hit.sha256 == hashlib.sha256((images / "a" / "red.png").read_bytes()).hexdigest()
    again = coll.add(images, enc)
    assert not again.added and len(again.unchanged) == 8
    agree(coll)


def test_filters(coll, enc, images):
    coll.add(images, enc)
    under_b = coll.search(text="red", encoder=enc, k=10, path_prefix=str(images / "b"))
    assert {Path(h.path).name for h in under_b} == {"dark_red.png", "navy.jpg"}
    x = clustered(4, coll.dim, 2, seed=3)
    ids = coll.add_vectors(x, [{"key": f"t{i}", "added": 1000.0 + i} for i in range(4)])
    got = coll.search(vector=x[0], k=10, added_after=1000.5, added_before=1002.5)
    assert sorted(h.id for h in got) == ids[1:3]
    assert coll.search(vector=x[0], k=10, path_prefix="zzz") == []


def test_negative_text_lowers_matching_items(coll, enc, images):
    coll.add(images, enc)
    plain = {h.path: h.score for h in coll.search(text="red yellow", encoder=enc, k=20)}
    neg = {h.path: h.score for h in coll.search(text="red yellow", negative="yellow", encoder=enc, k=20)}
    v_neg = enc.embed_texts(["yellow"])[0]
    for path, s in neg.items():  # score drops by exactly 0.5 * cos(item, negative)
        item = enc.embed_images([path])[0]
        assert s == pytest.approx(plain[path] - 0.5 * float(item @ v_neg), abs=1e-5)
    yellow = str(images / "a" / "yellow.png")
    assert neg[yellow] < plain[yellow] - 0.4
    assert max(neg, key=neg.get).endswith("red.png")


def test_text_plus_image_is_weighted_sum(coll, enc, images):
    coll.add(images, enc)
    img = images / "a" / "blue.png"
    t = {h.id: h.score for h in coll.search(text="green", encoder=enc, k=20)}
    i = {h.id: h.score for h in coll.search(image=img, encoder=enc, k=20)}
    both = coll.search(text="green", image=img, weights=(0.7, 0.3), encoder=enc, k=20)
    assert len(both) == len(t) == 8
    for h in both:
        assert h.score == pytest.approx(0.7 * t[h.id] + 0.3 * i[h.id], abs=1e-5)


def test_remove_leaves_no_orphans(tmp_path, enc, images):
    with Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim) as c:
        c.add(images, enc)
        assert c.remove(images / "b") == 2  # folder prefix, recursive
        assert c.remove(str(images / "a" / "red.png")) == 1
        some = c.search(text="blue", encoder=enc, k=2)
        assert c.remove([h.id for h in some]) == 2
        assert c.remove(10**9) == 0
        agree(c)
        left = {Path(h.path).stem for h in c.search(text="red", encoder=enc, k=20)}
        assert left == set(COLOURS) - {"red"} - {Path(h.path).stem for h in some}
    with Collection.open(tmp_path / "c") as c:
        agree(c)
        assert c.info()["rows"] == 3


def test_changed_file_is_replaced(coll, enc, images):
    coll.add(images, enc)
    f = images / "a" / "white.png"
    old = coll.search(text="white", encoder=enc, k=1)[0]
    solid(f, COLOURS["green"])
    r = coll.add(images, enc)
    assert r.updated == [str(f)] and not r.added and len(r.unchanged) == 7
    assert coll.get(old.id) is None
    greens = [h for h in coll.search(text="green", encoder=enc, k=2) if h.score > 0.999]
    assert sorted(Path(h.path).name for h in greens) == ["green.png", "white.png"]
    assert coll.conn.execute("SELECT COUNT(*) FROM items WHERE key=?", (str(f),)).fetchone()[0] == 1
    agree(coll)


def test_other_model_is_refused(coll, enc, images):
    other = FakeEncoder(fingerprint="sha256:other", seed=1)
    other.identity["model"] = "other-model"
    for call in (
        lambda: coll.check_encoder(other),
        lambda: coll.add(images, other),
        lambda: coll.search(text="red", encoder=other),
        lambda: coll.add_texts(["red"], other),
    ):
        with pytest.raises(ModelMismatchError, match="fake-colour.*other-model"):
            call()
    assert coll.info()["rows"] == 0
    wrong_dim = FakeEncoder(dim=16)
    with pytest.raises(ModelMismatchError, match="dim 16"):
        coll.check_encoder(wrong_dim)


def test_bad_input_is_rejected_and_loses_nothing(coll, enc, tmp_path):
    x = clustered(5, coll.dim, 2)
    coll.add_vectors(x, [{"key": str(i)} for i in range(5)])
    with pytest.raises(ValueError, match="at least one of"):
        coll.search()
    with pytest.raises(ValueError, match="k must be a positive"):
        coll.search(vector=x[0], k=0)
    with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
        coll.search(vector=np.ones(7))
    with pytest.raises(ValueError, match=r"shape \(N, 32\)"):
        coll.add_vectors(np.ones((2, 8)), [{}, {}])
    with pytest.raises(ValueError, match="2 vectors but 1 records"):
        coll.add_vectors(x[:2], [{}])
    with pytest.raises(ValueError, match="unknown keys.*colour"):
        coll.add_vectors(x[:1], [{"colour": 1}])
    with pytest.raises(ValueError, match="NaN"):
        coll.add_vectors(np.full((1, 32), np.nan), [{}])
    with pytest.raises(ValueError, match="need encoder"):
        coll.search(text="red")
    with pytest.raises(CollectionError, match="already exists"):
        Collection.create(coll.path, identity=enc.identity, dim=enc.dim)
    with pytest.raises(CollectionError, match="no collection"):
        Collection.open(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown index kind 'fast'"):
        Collection.create(tmp_path / "x", identity=enc.identity, dim=enc.dim, index="fast")
    assert coll.info()["rows"] == coll.info()["vectors"] == 5


def test_reopen_readers_and_single_writer(tmp_path, enc, images):
    c = Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim)
    c.add(images / "a", enc)
    with pytest.raises(CollectionError, match="another process"):
        Collection.open(tmp_path / "c")
    reader = Collection.open(tmp_path / "c", readonly=True)  # no snapshot yet: built from the database
    assert reader.info()["vectors"] == 6
    c.add(images / "b", enc)
    assert reader.info()["vectors"] == 6  # a reader sees the state it opened...
    reader.refresh()
    assert reader.info()["vectors"] == 8  # ...until it catches up
    with pytest.raises(CollectionError, match="readonly"):
        reader.add_vectors(np.ones((1, 32)), [{}])
    reader.close()
    c.close()
    assert len(list((tmp_path / "c").glob("index.flat.*.faiss"))) == 1
    c = Collection.open(tmp_path / "c")
    assert c.info()["model"] == enc.identity and c.info()["index"] == "auto"
    assert Path(c.search(text="red", encoder=enc, k=1)[0].path).name == "red.png"
    c.close()


def test_image_to_text_with_caption_collection(tmp_path, enc, images):
    with Collection.create(tmp_path / "caps", identity=enc.identity, dim=enc.dim) as caps:
        texts = ["a red thing", "green", "something blue", "yellow"]
        ids = caps.add_texts(texts, enc, metadata={"source": "test"})
        assert caps.add_texts(["green", "black"], enc)[0] == ids[1]  # known caption keeps its row
        assert caps.info()["rows"] == 5
        hit = caps.search(image=images / "a" / "blue.png", encoder=enc, k=1)[0]
        assert hit.caption == "something blue" and hit.path is None and hit.metadata == {"source": "test"}


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_recall(tmp_path, kind):
    dim = 64
    x = clustered(12_000, dim, 150, seed=5)
    c = Collection.create(
        tmp_path / kind, identity={"fingerprint": "synthetic", "dim": dim}, dim=dim, index=kind
    )
    ids = c.add_vectors(x, [{"key": f"v{i}"} for i in range(len(x))])
    info = c.info()
    assert info["index_active"] == kind and info["recall@10"] >= 0.95
    rng = np.random.default_rng(6)  # fresh queries from the same distribution
    q = x[rng.choice(len(x), 100)] + 0.35 * rng.standard_normal((100, dim)).astype(np.float32) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, got = c.search_batch(q, 10)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    id_arr = np.array(ids)
    assert np.mean([len(set(g) & set(id_arr[t])) / 10 for g, t in zip(got, truth)]) >= 0.95
    c.remove(ids[:100])
    agree(c)
    c.close()
    c = Collection.open(tmp_path / kind)
    assert c._ann.kind == kind
    agree(c)
    c.close()


def test_auto_kind_thresholds():
    assert ann.effective_kind("auto", 1000) == "flat"
    assert ann.effective_kind("auto", 300_000) == "hnsw"
    assert ann.effective_kind("auto", 10_000_000) == "ivfpq"
    assert ann.effective_kind("ivfpq", 100) == "flat"  # too few to train


def test_dedup_finds_planted_duplicates(coll):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, coll.dim)).astype(np.float32)  # far apart: max cosine ~0.7 at 32-d
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dups = {5: [300, 301], 40: [302], 200: [303]}
    extra = [
        x[src] + 0.02 * rng.standard_normal(coll.dim) / np.sqrt(coll.dim)
        for src, d in dups.items()
        for _ in d
    ]
    ids = coll.add_vectors(np.concatenate([x, np.array(extra)]), [{"key": str(i)} for i in range(304)])
    groups = coll.dedup(threshold=0.95)
    got = sorted(sorted(int(h.path) for h in g) for g in groups)
    assert got == [[5, 300, 301], [40, 302], [200, 303]]
    assert all(h.score >= 0.95 for g in groups for h in g) and ids[0] == groups[0][0].id - 5


def test_database_is_wal(coll):
    # Ask the file, through a connection of our own: WAL is persisted in the database file, so readers in
    # other processes (the server's) read while a writer commits. (Asking the collection's own connection,
    # which set the mode, was true by construction.)
    other = sqlite3.connect(coll.path / "items.sqlite")
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_recall_is_measured_on_queries_that_are_not_stored(tmp_path, monkeypatch):
    # A stored vector finds itself, which flatters HNSW; info() must query with fresh vectors.
    dim = 32
    x = clustered(400, dim, 10, seed=1)
    c = Collection.create(tmp_path / "h", identity={"fingerprint": "s", "dim": dim}, dim=dim, index="hnsw")
    c.add_vectors(x, [{"key": str(i)} for i in range(len(x))])
    seen = []
    search = c._ann.search

    def spy(q, k, allowed, fetch):
        seen.append(np.array(q))
        return search(q, k, allowed, fetch)

    monkeypatch.setattr(c._ann, "search", spy)
    assert 0.0 < c.info()["recall@10"] <= 1.0
    q = np.concatenate(seen)
    assert len(q) >= 100 and (q @ x.T).max(axis=1).max() < 0.999  # no query is a stored vector
    c.close()
