"""Manifests, shards and the loader: formats parse, shards round-trip, ranks x workers split an epoch without
repeats, random choices are seeded, resume yields the remaining batches, bad samples are counted across
worker processes and fail the run only above the allowed fraction."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.data.loader import BadDataError, build_loader
from clipforge.data.shards import read_shards, write_shards
from clipforge.data.sources import SourceError, read_manifest
from clipforge.data.synthetic import shape_samples, write_shapes
from clipforge.model.config import PreprocessConfig
from clipforge.transforms import Preprocess

# No skip without webdataset: it is a required dependency of this layer (the train extra) and the shard
# tests fail with its install hint when it is missing; the manifest tests do not need it.

N = 24
CFG = PreprocessConfig(image_size=16)


@pytest.fixture(scope="module")
def tok():
    return clipforge.train_tokenizer(
        [c for s in shape_samples(N, 16) for c in s.captions], 600, context_length=16
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), N, size=24, seed=0)


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    write_shards(shapes, out, shard_size=3)  # 8 shards of 3
    return out


def run(source, tok, **kw) -> list:
    """All batches of one pass as (images, tokens, meta)."""
    kw = {"batch_size": 4, "workers": 0, **kw}
    return list(build_loader(source, preprocess_cfg=CFG, tokenizer=tok, return_meta=True, **kw))


def keys(batches) -> list[str]:
    return [k for _, _, m in batches for k in m.keys]


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_relative_paths_captions_and_merged_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    rows = [
        {"image": "sub/a.png", "caption": " a cat "},
        {"image": "b.png", "caption": ["a dog", "", "a puppy"]},
        {"image": "c.png", "captions": ["x", "y"], "key": "see"},
        {"image": "sub/a.png", "caption": "a kitten"},  # a second row for a.png: one more caption
    ]
    m = tmp_path / "sub" / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = {s.key: s for s in read_manifest(m)}
    assert list(got) == ["sub/a.png", "b.png", "see"]
    assert got["sub/a.png"].image == str((tmp_path / "sub" / "sub" / "a.png").resolve())
    assert got["sub/a.png"].captions == ("a cat", "a kitten")
    assert got["b.png"].captions == ("a dog", "a puppy")
    assert got["see"].captions == ("x", "y")
    m.write_text('{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "caption": \n')
    with pytest.raises(SourceError, match=r"m\.jsonl:2"):
        read_manifest(m)


def test_csv_quoting_several_columns_and_tsv(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(
        "filepath,caption,caption_2,other\n"
        '/abs/a.jpg,"a cat, sitting ""politely""",a kitten|a small cat,zzz\n'
        'b.jpg,"two\nlines",,\n'
    )
    a, b = read_manifest(m)
    assert a.image == "/abs/a.jpg"
    assert a.captions == ('a cat, sitting "politely"', "a kitten", "a small cat")
    assert b.image == str(tmp_path.resolve() / "b.jpg") and b.captions == ("two\nlines",)
    t = tmp_path / "m.tsv"
    t.write_text("image\tcaption\nc.png\ta dog|a hound\n")
    (c,) = read_manifest(t)
    assert c.key == "c.png" and c.captions == ("a dog", "a hound")
    (tmp_path / "bad.csv").write_text("name,text\nx,y\n")
    with pytest.raises(SourceError, match="image column"):
        read_manifest(tmp_path / "bad.csv")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_manifest_encoding_bom_accepted_other_encodings_named(tmp_path, suffix):
    rows = {".jsonl": ['{"image": "a.png", "caption": "café"}'], ".csv": ["image,caption", "a.png,café"]}[
        suffix
    ]
    m = tmp_path / f"m{suffix}"
    m.write_bytes("\n".join(rows).encode("utf-8-sig"))  # as spreadsheet programs save "UTF-8" files
    ((sample),) = read_manifest(m)
    assert sample.key == "a.png" and sample.captions == ("café",)
    m.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(SourceError, match=rf"m\{suffix}.*not UTF-8 text"):
        read_manifest(m)


def test_folder_of_images_with_txt_captions(tmp_path, tok):
    samples = shape_samples(5, 16)
    for i, s in enumerate(samples):
        s.image.save(tmp_path / f"{i}.png")
        if i != 4:  # image 4 has no caption file: a bad sample
            (tmp_path / f"{i}.txt").write_text("\n".join(s.captions) + "\n\n")
    got = read_manifest(tmp_path)
    assert [s.key for s in got] == [f"{i}.png" for i in range(5)]
    assert got[0].captions == tuple(samples[0].captions) and got[4].captions == ()
    batches = run(tmp_path, tok, train=False, max_bad_fraction=0.5)
    assert sorted(keys(batches)) == [f"{i}.png" for i in range(4)]


# ------------------------------------------------------------------------------------------------ shards


def test_shards_round_trip(shapes, shard_dir, tok):
    info = json.loads((shard_dir / "shards.json").read_text())
    assert info["count"] == N and info["counts"] == [3] * 8 and info["source"] == str(shapes)
    rows = [json.loads(x) for x in shapes.read_text().splitlines()]
    recs = list(read_shards(shard_dir))
    assert [caps for _, _, caps in recs] == [tuple(r["captions"]) for r in rows]
    assert all(img == (shapes.parent / r["image"]).read_bytes() for (_, img, _), r in zip(recs, rows))
    # The loader over shards yields the same preprocessed images and captions as over the manifest, and
    # both equal Preprocess applied to the files (the reference).
    pre = Preprocess(CFG)
    ref = sorted((pre(shapes.parent / r["image"]).sum().item(), r["captions"][0]) for r in rows)
    for source in (shapes, shard_dir, str(shard_dir / "{00000..00007}.tar")):
        batches = run(source, tok, train=False, workers=2)
        got = sorted((x.sum().item(), c) for ims, _, m in batches for x, c in zip(ims, m.captions))
        assert [c for _, c in got] == [c for _, c in ref]
        assert torch.allclose(torch.tensor([v for v, _ in got]), torch.tensor([v for v, _ in ref]))
    ims, tokens, meta = run(shard_dir, tok, train=False)[0]
    assert torch.equal(tokens, tok(meta.captions))


# -------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_ranks_and_workers_split_an_epoch_without_repeats(kind, shapes, shard_dir, tok):
    source = shapes if kind == "manifest" else shard_dir
    everything = set(keys(run(source, tok, train=False)))
    assert len(everything) == N
    for train in (False, True):
        per_rank = [keys(run(source, tok, train=train, rank=r, world_size=2, workers=2)) for r in (0, 1)]
        seen = Counter(per_rank[0] + per_rank[1])
        assert max(seen.values()) == 1, "a sample was read twice in one epoch"
        # 24 samples = 2 ranks x 3 batches x 4, so training covers everything too (8 shards of 3 = 2 ranks
        # x 2 workers x 2 shards: 6 samples, one full batch per worker, so 16 of 24 without repeats).
        assert set(seen) == everything if (train is False or kind == "manifest") else len(seen) == 16
        assert len(per_rank[0]) == len(per_rank[1])  # ranks stay in step


def test_seeded_shuffle_captions_and_crops(shapes, shard_dir, tok):
    for source in (shapes, shard_dir):
        a = run(source, tok, seed=3, epoch=1, workers=2)
        # For manifests the worker count does not change the result; shards are split between workers.
        b = run(source, tok, seed=3, epoch=1, workers=0 if source == shapes else 2)
        c = run(source, tok, seed=3, epoch=2, workers=2)
        assert keys(a) == keys(b)
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
        assert keys(a) != keys(c)
        assert set(keys(a)) == set(keys(c))
    # Captions vary across epochs (3 captions per image); crops differ from the eval transform.
    caps = []
    for epoch in (0, 1, 2):
        batches = run(shapes, tok, epoch=epoch)
        caps.append(dict(zip(keys(batches), [c for _, _, m in batches for c in m.captions])))
    assert sum(caps[0][k] != caps[1][k] or caps[0][k] != caps[2][k] for k in caps[0]) > N // 2
    ims, _, meta = run(shapes, tok, batch_size=1, samples_per_epoch=1)[0]
    assert not torch.allclose(ims[0], Preprocess(CFG)(shapes.parent / meta.keys[0]))


@pytest.mark.parametrize("kind", ["manifest", "shards"])
def test_start_batch_yields_the_remaining_batches(kind, shapes, shard_dir, tok):
    source = shapes if kind == "manifest" else shard_dir
    kw = {"batch_size": 2, "workers": 2, "seed": 1, "epoch": 4}
    full = run(source, tok, **kw)
    loader = build_loader(source, preprocess_cfg=CFG, tokenizer=tok, start_batch=3, return_meta=True, **kw)
    assert len(loader) == len(full) - 3 and loader.batches_per_epoch == len(full)
    rest = list(loader)
    assert [m.keys for _, _, m in rest] == [m.keys for _, _, m in full[3:]]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(rest, full[3:]))


def test_streamed_shards_need_a_sample_count(shard_dir, tok):
    # A `pipe:` URL is read as a stream, like a remote shard: no sidecar or header count is available.
    source = f"pipe:cat {shard_dir}/{{00000..00007}}.tar"
    with pytest.raises(ValueError, match="samples_per_epoch"):
        run(source, tok)
    got = keys(run(source, tok, workers=2, samples_per_epoch=N))
    assert len(got) == N == len(set(got))


def test_samples_per_epoch(shapes, tok):
    assert len(run(shapes, tok, samples_per_epoch=8)) == 2
    long = keys(run(shapes, tok, samples_per_epoch=2 * N))
    assert Counter(long) == Counter({k: 2 for k in set(long)}) and len(set(long)) == N


# ------------------------------------------------------------------------------------------ bad samples


@pytest.fixture
def dirty(shapes, tmp_path) -> tuple[Path, set[str]]:
    rows = [json.loads(x) for x in shapes.read_text().splitlines()]
    for r in rows:
        r["image"] = str(shapes.parent / r["image"])
    (tmp_path / "garbage.png").write_bytes(b"not a png at all")
    rows[1]["image"] = str(tmp_path / "missing.png")
    rows[6]["image"] = str(tmp_path / "garbage.png")
    rows[13]["captions"] = ["  "]
    m = tmp_path / "dirty.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return m, {rows[i]["image"] for i in (1, 6, 13)}


def test_bad_samples_skipped_and_counted_across_workers(dirty, tok):
    m, bad = dirty
    loader = build_loader(
        m,
        preprocess_cfg=CFG,
        tokenizer=tok,
        batch_size=4,
        train=False,
        workers=2,
        max_bad_fraction=0.2,
        return_meta=True,
    )
    got = keys(list(loader))
    assert (loader.stats.seen, loader.stats.bad) == (N, 3)  # bad ones sat in batches of both workers
    assert len(got) == N - 3 and not bad & set(got)
    text = " ".join(loader.stats.examples)
    assert "missing.png" in text and "garbage.png" in text and "no caption" in text
    # Training keeps batches full by drawing unused samples from the epoch's tail: no repeats.
    loader = build_loader(
        m,
        preprocess_cfg=CFG,
        tokenizer=tok,
        batch_size=4,
        workers=2,
        max_bad_fraction=0.2,
        samples_per_epoch=16,
        return_meta=True,
    )
    batches = list(loader)
    got = keys(batches)
    assert all(len(ims) == 4 for ims, _, _ in batches) and len(got) == 16 == len(set(got))
    assert not bad & set(got) and loader.stats.seen == 16 + loader.stats.bad


def test_too_many_bad_samples_fail_naming_examples(dirty, tok):
    m, _ = dirty
    with pytest.raises(BadDataError, match=r"3 bad of 24.*missing\.png"):
        run(m, tok, train=False, workers=2, max_bad_fraction=0.1)


def test_corrupt_shard_members(shard_dir, tmp_path, tok):
    d = tmp_path / "s"
    d.mkdir()
    for p in shard_dir.glob("*.tar"):
        (d / p.name).write_bytes(p.read_bytes())
    with tarfile.open(d / "00008.tar", "w") as tf:
        members = [("x1.png", b"garbage"), ("x1.txt", b"a cat"), ("x2.png", b"\x89PNG"), ("x3.json", b"{}")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    whole = (d / "00007.tar").read_bytes()
    (d / "00007.tar").write_bytes(whole[: len(whole) // 2 + 700])  # truncated inside a member
    loader = build_loader(
        d,
        preprocess_cfg=CFG,
        tokenizer=tok,
        batch_size=4,
        train=False,
        workers=2,
        max_bad_fraction=0.5,
        return_meta=True,
    )
    got = keys(list(loader))
    assert len(got) == len(set(got)) >= 21
    assert loader.stats.bad >= 4  # x1 (undecodable), x2 (no caption), x3 (no image), the truncated tail
    text = " ".join(loader.stats.examples)
    assert "00008.tar/x1" in text and "no caption" in text and "no image" in text


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_data_shard_and_info(shapes, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(["data", "shard", str(shapes), "--out", str(out), "--shard-size", "10", "--quiet", "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == [10, 10, 4] and sorted(p.name for p in out.glob("*.tar")) == result["shards"]
    assert main(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == N
    assert main(["data", "info", str(shapes), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["captions_per_image"] == 3.0
    assert main(["data", "shard", str(shapes), "--out", str(out), "--quiet"]) == 2  # not empty
    assert "already holds" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "nope.jsonl")]) == 2


def test_cli_data_fetch_calls_the_corpus_builder(tmp_path, monkeypatch, capsys):
    from clipforge.data import corpus

    calls = []

    def fake_fetch(out_dir, cfg, progress):
        calls.append((out_dir, cfg, progress))
        (out_dir / "train.jsonl").write_text("")
        return out_dir

    monkeypatch.setattr(corpus, "fetch_corpus", fake_fetch)
    assert main(["data", "fetch", "--out", str(tmp_path), "--image-size", "64", "--quiet", "--json"]) == 0
    ((out, cfg, progress),) = calls
    assert out == tmp_path and cfg.image_size == 64 and progress is False
    assert json.loads(capsys.readouterr().out)["train.jsonl"] == str(tmp_path / "train.jsonl")
