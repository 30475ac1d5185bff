"""The bulk embedding pipeline: clip-retrieval's layout, numerics against the Encoder, skipped files, the fast
JPEG path, manifests and shards, resuming after an interruption, and IVF-PQ built from sharded output."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import save_tiny_model
from memlimit import GB, address_space_cap
from PIL import Image

from clipforge.data.sources import read_embeddings
from clipforge.data.synthetic import shape_samples, write_shapes
from clipforge.encoder import Encoder
from clipforge.index import embed_output as eo
from clipforge.index.bulk import build_ivfpq
from clipforge.index.embed import embed_to_folder
from clipforge.index.sources import list_items


@pytest.fixture(scope="module")
def enc(tmp_path_factory) -> Encoder:
    return Encoder.load(save_tiny_model(tmp_path_factory.mktemp("model") / "m"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """7 images (PNG and JPEG) with caption sidecars, a corrupt file and a non-image file."""
    d = tmp_path_factory.mktemp("imgs")
    for i, s in enumerate(shape_samples(7, size=48, seed=1)):
        s.image.save(d / f"{i:02d}.{'jpg' if i % 2 else 'png'}")
        (d / f"{i:02d}.txt").write_text(s.captions[0])
    (d / "05_bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "05_bad.txt").write_text("a broken file")
    (d / "notes.md").write_text("not an image")
    return d


def read_folder(out: Path) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    img = np.concatenate([p.vectors for p in read_embeddings(out)]).astype(np.float32)
    rows = [r for f in sorted((out / "metadata").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    text_files = sorted((out / "text_emb").glob("*.npy"))
    text = np.concatenate([np.load(f) for f in text_files]).astype(np.float32) if text_files else None
    return img, text, rows


def test_layout_and_vectors_equal_the_encoder(enc, folder, tmp_path):
    out = tmp_path / "emb"
    s = embed_to_folder(
        folder, enc, out, part_size=3, batch_size=2, workers=1, exact_decode=True, dtype="float32"
    )
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{i}.parquet" for i in range(3)]
    assert s.items == 8 and s.embedded == 7
    assert s.skipped == [(str(folder / "05_bad.jpg"), s.skipped[0][1])] and "not" in s.skipped[0][1]
    table = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert table.column_names[:3] == ["image_path", "caption", "sha256"]
    img, text, rows = read_folder(out)
    paths = [r["image_path"] for r in rows]
    assert paths == sorted(
        str(p) for p in folder.iterdir() if p.suffix in (".jpg", ".png") and "bad" not in p.name
    )
    np.testing.assert_allclose(img, enc.embed_images(paths), atol=2e-5)
    np.testing.assert_allclose(text, enc.embed_texts([r["caption"] for r in rows]), atol=2e-5)
    side = json.loads((out / "embeddings.json").read_text())
    assert side["model"] == enc.identity and side["dim"] == enc.dim and side["captions"] is True


def test_fast_jpeg_is_default_and_close_to_exact(enc, tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).resize((800, 600), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=90)
    fast = embed_to_folder(tmp_path / "big.jpg", enc, tmp_path / "f", workers=0, dtype="float32")
    exact = embed_to_folder(
        tmp_path / "big.jpg", enc, tmp_path / "e", workers=0, dtype="float32", exact_decode=True
    )
    assert fast.embedded == exact.embedded == 1
    a, b = read_folder(tmp_path / "f")[0][0], read_folder(tmp_path / "e")[0][0]
    np.testing.assert_allclose(b, enc.embed_images([tmp_path / "big.jpg"])[0], atol=2e-5)
    assert not np.array_equal(a, b)  # the draft decode really ran
    assert float(a @ b) > 0.999


def test_resume_redoes_only_unfinished_parts(enc, folder, tmp_path, monkeypatch):
    out = tmp_path / "emb"
    ref = embed_to_folder(folder, enc, tmp_path / "ref", part_size=3, batch_size=3, workers=0)
    calls = {"n": 0}
    real = enc.embed_pixels

    def flaky(pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted while embedding the second part
        return real(pixels)

    monkeypatch.setattr(enc, "embed_pixels", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_to_folder(folder, enc, out, part_size=3, batch_size=3, workers=0)
    assert eo.done_parts(out) == {0}
    monkeypatch.setattr(enc, "embed_pixels", real)
    seen = []
    monkeypatch.setattr(enc, "embed_pixels", lambda px: seen.append(len(px)) or real(px))
    s = embed_to_folder(folder, enc, out, part_size=3, batch_size=3, workers=0)
    assert s.parts_done_before == 1 and sum(seen) == 4  # parts 1 and 2 (one bad file among them)
    for x, y in zip(read_folder(out), read_folder(tmp_path / "ref")):
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
    assert s.skipped == ref.skipped
    with pytest.raises(eo.EmbeddingFolderError, match="another run"):
        embed_to_folder(folder, enc, out, part_size=4, workers=0)


def test_manifest_and_shard_inputs(enc, tmp_path):
    manifest = write_shapes(tmp_path / "shapes", 4, 40, 3)
    shard = tmp_path / "s-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, smp in enumerate(shape_samples(3, size=40, seed=5)):
            buf = io.BytesIO()
            smp.image.save(buf, format="JPEG", quality=95)
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", smp.label.encode()),
                ("json", json.dumps({"n": i}).encode()),
            ):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = list_items([manifest, shard])
    assert [it.key for it in items[4:]] == ["s-000.tar/k0", "s-000.tar/k1", "s-000.tar/k2"]
    s = embed_to_folder([manifest, shard], enc, tmp_path / "o", workers=1, exact_decode=True, dtype="float32")
    assert s.embedded == 7
    img, text, rows = read_folder(tmp_path / "o")
    assert rows[0]["label"] and rows[5]["n"] == 1 and rows[5]["caption"] == shape_samples(3, 40, 5)[1].label
    np.testing.assert_allclose(img[4:], enc.embed_images([it.read() for it in items[4:]]), atol=2e-5)
    assert text is not None and text.shape == img.shape


def test_part_names_are_padded_like_clip_retrieval():
    assert eo.part_name(0, 1) == "0" and eo.part_name(3, 10) == "03" and eo.part_name(7, 100) == "007"


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((40, dim))
    x = c[rng.integers(40, size=n)] / np.sqrt(dim) * 3 + rng.standard_normal((n, dim)) * 0.1
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivfpq_from_sharded_embeddings(tmp_path):
    """Train on a sample, add in memory-mapped chunks; results equal brute force after exact re-ranking."""
    dim, n = 32, 3000
    x = clustered(n, dim)
    ident = {"model": "synthetic", "fingerprint": "sha256:x", "dim": dim}
    out = tmp_path / "emb"
    header = {
        "format": eo.FORMAT,
        "model": ident,
        "dim": dim,
        "dtype": "float32",
        "part_size": 1000,
        "parts": 3,
        "count": n,
        "captions": False,
        "input": "synthetic",
    }
    eo.prepare(out, header)
    for p in range(3):
        rows = [
            {"image_path": f"/img/{i}.jpg", "caption": None, "sha256": str(i)}
            for i in range(p * 1000, p * 1000 + 1000)
        ]
        eo.write_part(out, p, 3, x[p * 1000 : (p + 1) * 1000], None, rows, [], "float32")
    with build_ivfpq(out, tmp_path / "col", chunk=700) as col:
        info = col.info()
        assert info["vectors"] == info["rows"] == n and info["index_active"] == "ivfpq"
        assert info["recall@10"] >= 0.95
        scores, ids = col.search_batch(x[:20], 5)
        hit = col.get(int(ids[0, 0]))
        assert hit.path == "/img/0.jpg"
        top = np.argsort(-(x[:20] @ x.T), axis=1)[:, :5]
        assert (
            np.mean(
                [len(set(hits_paths(col, i)) & {f"/img/{j}.jpg" for j in t}) / 5 for i, t in zip(ids, top)]
            )
            >= 0.95
        )
    from clipforge.index import Collection

    with Collection.open(tmp_path / "col", readonly=True) as col:
        assert col._ann.kind == "ivfpq" and len(col) == n  # the trained index survives reopening


def hits_paths(col, ids) -> list[str]:
    return [col.get(int(i)).path for i in ids if i >= 0]


def test_csv_manifest_uses_the_shared_reader(enc, tmp_path):
    for i, s in enumerate(shape_samples(2, size=40, seed=4)):
        s.image.save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text('image,caption\n0.png,"a red, round thing"\n1.png,second\n')
    items = list_items(tmp_path / "m.csv")
    assert [it.caption for it in items] == ["a red, round thing", "second"]
    assert items[0].key == str(tmp_path / "0.png")


def test_extreme_strips_are_skipped_by_name_in_bounded_memory(enc, tmp_path):
    # The workers resized the short side to the model's 32 px first: 2000000x1 became 64M x 32 pixels (8 GB;
    # under the cap a MemoryError, reported as "failed"). Now the header check refuses each strip by name.
    d = tmp_path / "strips"
    d.mkdir()
    for w, h in [(200_000, 1), (1, 200_000), (2_000_000, 1)]:
        Image.new("L", (w, h), 50).save(d / f"strip_{w}x{h}.png")
    shape_samples(1, size=40, seed=3)[0].image.save(d / "ok.png")
    with address_space_cap(2 * GB):
        s = embed_to_folder(d, enc, tmp_path / "emb", workers=0, dtype="float32")
    assert s.embedded == 1 and len(s.skipped) == 3
    for key, reason in s.skipped:
        w, h = Path(key).stem.split("_")[1].split("x")
        assert reason.startswith(f"{w}x{h} has an aspect ratio") and "max_aspect" in reason, reason
    assert [r["image_path"] for r in read_folder(tmp_path / "emb")[2]] == [str(d / "ok.png")]


def test_videos_are_a_row_per_moment_that_a_collection_takes_as_its_own(enc, tmp_path, capsys):
    """`embed FOLDER` used to list images only, so the folder's videos were left out without a word. Now
    each video is a row per sampled moment under the collection's key and metadata, and a video that does
    not open is skipped by name; `index add` of the folder then stores rows that adding the folder itself
    finds unchanged."""
    import hashlib

    from media_files import write_video

    from clipforge.cli import main
    from clipforge.index import Collection
    from clipforge.index.embed_ray import decode_rows
    from clipforge.media.video import frame_at

    d = tmp_path / "library"
    d.mkdir()
    shape_samples(1, size=40, seed=5)[0].image.save(d / "photo.png")
    clip = d / "clip.mp4"
    write_video(clip, seconds=7.5)
    (d / "broken.mov").write_bytes(b"\x00not a video" * 50)
    out = tmp_path / "emb"
    s = embed_to_folder(d, enc, out, workers=1, dtype="float32", video_interval=2.5)
    assert s.skipped == [(str(d / "broken.mov"), s.skipped[0][1])], s.skipped
    assert s.skipped[0][1].startswith("cannot decode video"), s.skipped
    img, _, rows = read_folder(out)
    moments = [f"{clip}#t={t}" for t in ("0.0", "2.5", "5.0")]
    assert [r["image_path"] for r in rows] == [str(d / "photo.png"), *moments]
    sha = hashlib.sha256(clip.read_bytes()).hexdigest()
    assert {k: rows[2][k] for k in ("video", "t", "sha256")} == {"video": str(clip), "t": 2.5, "sha256": sha}
    frames = [frame_at(clip, t) for t in (0.0, 2.5, 5.0)]
    np.testing.assert_allclose(img[1:], enc.embed_images(frames), atol=2e-5)
    # The Ray decode tasks read the same moment from a row.
    row = {"i": [0], "key": [moments[1]], "path": [str(clip)], "offset": [0], "length": [-1], "caption": [""]}
    got = decode_rows(
        {**{k: np.array(v) for k, v in row.items()}, "t": np.array([2.5]), "failed": [""]}, enc.preprocess
    )
    np.testing.assert_allclose(got["pixels"][0], enc.preprocess(frames[1]).numpy(), atol=1e-6)

    with Collection.create(tmp_path / "col", identity=enc.identity, dim=enc.dim) as col:
        stored = col.add(out)
        assert stored.added == [str(d / "photo.png"), *moments]
        assert col.get(col.keys_under(d)[moments[2]][0]).metadata == {"video": str(clip), "t": 5.0}
        again = col.add(d, enc, workers=0, video_interval=2.5)
        assert again.unchanged == [str(d / "photo.png"), str(clip)] and not again.added + again.updated

    # The command line: a video file as input, and the sampling flags.
    args = ["embed", str(clip), "--model", enc.identity["model"], "--out", str(tmp_path / "one"), "--json"]
    assert main([*args, "--video-max-frames", "1"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["embedded"] == 1
    assert main([*args, "--video-interval", "-1"]) == 2
    assert "video_interval" in capsys.readouterr().err
