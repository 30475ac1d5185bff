"""`clipforge index|search|dedup|embed` round trips on synthetic images with a tiny random model, checked
against the Python API (Collection.search with the same Encoder) and against Encoder outputs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_model

from clipforge.cli import main
from clipforge.cli.index import parse_query
from clipforge.data.synthetic import shape_samples
from clipforge.encoder import Encoder
from clipforge.index import Collection


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def enc(model) -> Encoder:
    return Encoder.load(model)


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for i, s in enumerate(shape_samples(6, size=40, seed=2)):
        s.image.save(d / ("sub" if i >= 4 else "") / f"{i}.png")
    shutil.copy(d / "0.png", d / "sub" / "copy_of_0.png")  # an exact duplicate for dedup
    return d


def run(capsys, *args) -> dict:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def fail(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    return err


def test_round_trip(capsys, model, enc, images, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    rep = run(capsys, "index", "add", col, images, "--workers", "1", "--json")
    assert rep["added"] == 7 and rep["vectors"] == rep["rows"] == 7 and rep["failed"] == []
    again = run(capsys, "index", "add", col, images, "--workers", "0", "--json")
    assert again["unchanged"] == 7 and again["added"] == 0
    info = run(capsys, "index", "info", col, "--json")
    assert (
        info["vectors"] == info["rows"] == 7 and info["model"]["fingerprint"] == enc.identity["fingerprint"]
    )

    # --min-relevance 0: the plain top k (a tiny random model's scores say nothing about relevance)
    res = run(capsys, "search", col, "a red circle -square", "--k", "3", "--min-relevance", "0", "--json")
    assert res["query"] == {"text": "a red circle", "negative": ["square"], "image": None}
    with Collection.open(col, readonly=True) as c:
        ref = c.search(text="a red circle", negative=["square"], k=3, encoder=enc)
        stored = {h.path: c.vectors(np.array([h.id]))[0] for h in c.search(vector=np.ones(enc.dim), k=7)}
    assert [h["id"] for h in res["hits"]] == [h.id for h in ref]
    np.testing.assert_allclose([h["score"] for h in res["hits"]], [h.score for h in ref], atol=1e-5)
    paths = sorted(stored)
    np.testing.assert_allclose(np.stack([stored[p] for p in paths]), enc.embed_images(paths), atol=2e-5)

    img = run(
        capsys,
        "search",
        col,
        "--image",
        images / "sub" / "4.png",
        "--k",
        "2",
        "--min-relevance",
        "0",
        "--json",
    )
    assert img["hits"][0]["path"] == str(images / "sub" / "4.png") and img["hits"][0]["score"] > 0.9999
    sub = run(
        capsys, "search", col, "a shape", "--path-prefix", images / "sub", "--min-relevance", "0", "--json"
    )
    assert {Path(h["path"]).parent.name for h in sub["hits"]} == {"sub"} and len(sub["hits"]) == 3
    later = run(capsys, "search", col, "a shape", "--after", time.time() + 60, "--json")
    assert later["hits"] == []
    everything = run(
        capsys, "search", col, "a shape", "--before", "2999-01-01", "--min-relevance", "0", "--json"
    )
    assert len(everything["hits"]) == 7

    groups = run(capsys, "dedup", col, "--threshold", "0.9999", "--json")["groups"]
    assert [sorted(Path(m["path"]).name for m in g) for g in groups] == [["0.png", "copy_of_0.png"]]

    removed = run(capsys, "index", "remove", col, images / "sub", "--json")
    assert removed["removed"] == 3 and removed["vectors"] == removed["rows"] == 4


def test_parse_query():
    assert parse_query("bicycle -people -cars") == ("bicycle", ["people", "cars"])
    assert parse_query("a - b") == ("a - b", [])
    assert parse_query("-people") == (None, ["people"])


def test_other_model_is_refused(capsys, model, images, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    other = save_tiny_model(tmp_path / "other", seed=1)
    err = fail(capsys, "search", col, "a red circle", "--model", other)
    assert "was built with" in err and str(col) in err
    assert "needs a text query" in fail(capsys, "search", col, "--", "-people")
    emb = tmp_path / "emb"
    run(capsys, "embed", images, "--model", other, "--out", emb, "--workers", "0", "--json")
    assert "was made with" in fail(capsys, "index", "add", col, emb)


def test_embed_folder_then_index_add_without_reembedding(capsys, model, enc, images, tmp_path):
    emb = tmp_path / "emb"
    s = run(
        capsys,
        "embed",
        images,
        "--model",
        model,
        "--out",
        emb,
        "--part-size",
        "4",
        "--workers",
        "1",
        "--exact-decode",
        "--json",
    )
    assert s["embedded"] == 7 and s["parts"] == 2
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--index", "flat", "--json")
    rep = run(capsys, "index", "add", col, emb, "--json")
    assert rep["added"] == 7 and rep["vectors"] == 7
    assert run(capsys, "index", "add", col, emb, "--json")["unchanged"] == 7
    assert run(capsys, "index", "add", col, images, "--json")["unchanged"] == 7  # same sha256 as the files
    with Collection.open(col, readonly=True) as c:
        hits = c.search(vector=np.ones(enc.dim), k=7)
        got = c.vectors(np.array([h.id for h in hits]))
    np.testing.assert_allclose(got, enc.embed_images([h.path for h in hits]), atol=2e-3)  # stored as float16


def test_add_routes_each_input_by_the_readers_source_kind(capsys, model, enc, tmp_path):
    """`index add` routes by data.sources.source_kind: a folder of .tar shards is embedded as shards (it was
    walked as files, each .tar "not an image"), a missing path is reported, in one command."""
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = shape_samples(4, size=40, seed=3)
    for t in range(2):
        with tarfile.open(shards / f"{t}.tar", "w") as tar:
            for i, s in enumerate(samples[2 * t : 2 * t + 2]):
                buf = io.BytesIO()
                s.image.save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", s.captions[0].encode())):
                    info = tarfile.TarInfo(f"k{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--index", "flat", "--json")
    missing = tmp_path / "gone.png"
    rep = run(capsys, "index", "add", col, shards, missing, "--workers", "0", "--json")
    assert rep["added"] == 4 and [f["path"] for f in rep["failed"]] == [str(missing)]
    with Collection.open(col, readonly=True) as c:
        got = {h.path: h.caption for h in c.search(vector=np.ones(enc.dim), k=10)}
    keys = [f"{t}.tar/k{i}" for t in range(2) for i in range(2)]
    assert got == dict(zip(keys, [s.captions[0] for s in samples]))


def test_captions_and_image_to_text(capsys, model, images, tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("\n".join(s.label for s in shape_samples(6, size=40, seed=2)))
    col = tmp_path / "caps"
    run(capsys, "index", "create", col, "--model", model, "--json")
    assert run(capsys, "index", "add", col, "--texts", caps, "--json")["captions"] == 6
    res = run(
        capsys, "search", col, "--image", images / "0.png", "--k", "3", "--min-relevance", "0", "--json"
    )
    assert len(res["hits"]) == 3 and all(h["caption"] and h["path"] is None for h in res["hits"])


def test_approximate_index_reports_recall(capsys, model, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--index", "hnsw", "--json")
    rng = np.random.default_rng(0)
    with Collection.open(col) as c:
        x = rng.standard_normal((300, c.dim)).astype(np.float32)
        c.add_vectors(x, [{"key": f"k{i}"} for i in range(300)])
    info = run(capsys, "index", "info", col, "--json")
    assert {"vectors", "rows", "model", "recall@10"} <= set(info) and info["recall@10"] >= 0.95


def test_python_api_adds_manifests_like_the_cli(enc, tmp_path):
    # Collection.add routes every input kind through index.ingest, as the CLI and the service do (before:
    # a manifest given to the Python API was tried as an image file, and failed).
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name, rgb in (("r", (255, 0, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (16, 16), rgb).save(tmp_path / "img" / f"{name}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "img/r.png", "caption": "red"}\n{"image": "img/b.png"}\n')
    with Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim) as c:
        rep = c.add([manifest], enc, workers=0)
        assert sorted(Path(p).name for p in rep.added) == ["b.png", "r.png"] and not rep.failed
        assert c.add([manifest], enc, workers=0).unchanged == rep.added
        hits = c.search(text="red", k=2, mode="keyword")
        assert [Path(h.path).name for h in hits] == ["r.png"] and hits[0].caption == "red"


def test_sync_keywords_captions_only_and_date_sort(capsys, model, images, tmp_path):
    col = tmp_path / "col"
    run(capsys, "index", "create", col, "--model", model, "--json")
    run(capsys, "index", "add", col, images, "--workers", "0", "--json")
    (images / "1.png").unlink()
    shutil.copy(images / "2.png", images / "sub" / "new_beachDay.png")
    out = run(capsys, "index", "sync", col, images, "--workers", "0", "--json")
    assert (out["added"], out["removed"], out["unchanged"], out["rows"]) == (1, 1, 6, 7)
    hit = run(capsys, "search", col, "beach day", "--mode", "keyword", "--json")["hits"][0]
    assert hit["path"] == str(images / "sub" / "new_beachDay.png") and hit["relevance"] > 0.5

    caps = tmp_path / "caps.txt"
    caps.write_text("a red circle\na blue square\n")
    run(capsys, "index", "add", col, "--texts", caps, "--json")
    only = run(capsys, "search", col, "--image", images / "0.png", "--modality", "text", "--k", "9", "--json")
    assert sorted(h["caption"] for h in only["hits"]) == ["a blue square", "a red circle"]

    with Collection.open(col) as c:  # two photos with EXIF dates, as `index add` stores them
        for name, taken in (("2.png", "2019-05-01T09:00:00"), ("3.png", "2024-02-01T18:00:00")):
            (row,) = c.lookup(str(images / name))
            c.remove(row[0])
            v = np.ones((1, c.dim), np.float32)
            c.add_vectors(v, [{"path": str(images / name), "metadata": {"taken_at": taken}}])
    args = [
        "--before",
        "2025-01-01",
        "--sort",
        "date",
        "--min-relevance",
        "0",
        "--modality",
        "image",
        "--json",
    ]
    dated = run(capsys, "search", col, "a shape", *args)["hits"]
    assert [Path(h["path"]).name for h in dated] == ["3.png", "2.png"]
    assert "neither a date" in fail(capsys, "search", col, "x", "--after", "soon")
