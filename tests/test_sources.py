"""THE reader (clipforge.data.sources): one caption rule, one path rule, one error type, shards read the same
locally and streamed, rank x worker splits cover every item once, embedding folders read as parts; and the
same lines given as JSONL, CSV, TSV, a folder or shards reach training, evaluation and indexing as the same
samples. Streamed shards need the train extra (webdataset), embedding folders and the embed pipeline the
index extra (pyarrow): installed for the suite, so a missing one fails rather than skips."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.data import sources as src
from clipforge.data.sample import Member, Sample, SampleError, SourceError, SourceNotFoundError
from clipforge.data.synthetic import shape_samples
from clipforge.model.config import PreprocessConfig
from clipforge.transforms import Preprocess

CFG = PreprocessConfig(image_size=16)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    shape_samples(1, size=16, seed=seed)[0].image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------ rules


def test_caption_rule_captions_then_caption_then_text(tmp_path):
    m = jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": "second choice", "captions": [" first ", "", "also"]},
            {"image": "b.png", "caption": ["a dog", "a puppy"], "text": "ignored"},
            {"image": "c.png", "captions": None, "text": "from text"},
            {"image": "d.png"},
        ],
    )
    got = {s.key: s for s in src.read_manifest(m)}
    assert got["a.png"].captions == ("first", "also")
    assert got["b.png"].captions == ("a dog", "a puppy")
    assert got["c.png"].captions == ("from text",)
    assert got["d.png"].captions == ()
    assert all(set(s.metadata) == set() for s in got.values())  # caption fields are not metadata
    jsonl(m, [{"image": "a.png", "caption": "ok"}, {"image": "b.png", "captions": [3]}])
    with pytest.raises(SourceError, match=r"m\.jsonl:2: captions must be"):
        src.read_manifest(m)


def test_csv_caption_columns_and_text_fallback(tmp_path):
    (tmp_path / "m.csv").write_text('image,caption,caption_2,label\na.png,"x, y",z|w,cat\nb.png,,,\n')
    a, b = src.read_manifest(tmp_path / "m.csv")
    assert a.captions == ("x, y", "z", "w") and a.metadata == {"label": "cat"}
    assert b.captions == () and b.metadata == {}  # empty cells are absent, not ""
    (tmp_path / "t.tsv").write_text("image_path\ttext\tkey\nc.png\tone|two\tk1\n")
    (c,) = src.read_manifest(tmp_path / "t.tsv")
    assert (c.key, c.captions, c.image) == ("k1", ("one", "two"), str(tmp_path / "c.png"))


def test_path_rule_is_absolute_and_normalised_but_keeps_symlinks(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "a.png").write_bytes(png())
    link = tmp_path / "library"
    link.symlink_to(real, target_is_directory=True)
    jsonl(
        link / "m.jsonl",
        [
            {"image": "sub/./x/../a.png", "caption": "a"},
            {"image": "/abs/b.png", "caption": "b"},
            {"image": "https://example.invalid/c.png", "caption": "c"},
        ],
    )
    monkeypatch.chdir(tmp_path)
    a, b, c = src.read_manifest("library/m.jsonl")
    assert a.image == str(link / "sub" / "a.png")  # the link's name, not real/...
    assert (b.image, c.image) == ("/abs/b.png", "https://example.invalid/c.png")
    (f,) = src.read_manifest("library/sub")
    assert f.image == str(link / "sub" / "a.png") and f.key == "a.png"


def test_one_error_type_naming_file_and_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"image": "a.png"}\n\n{"image": \n')
    with pytest.raises(SourceError, match=r"m\.jsonl:3: not valid JSON"):
        src.read_manifest(m)
    m.write_text('{"image": "a.png"}\n{"caption": "no image"}\n')
    with pytest.raises(SourceError, match=r"m\.jsonl:2: needs an image path"):
        src.read_manifest(m)
    (tmp_path / "m.csv").write_text("image,caption\na.png,x\nb.png,y,extra\n")
    with pytest.raises(SourceError, match=r"m\.csv:3: 3 fields"):
        src.read_manifest(tmp_path / "m.csv")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(SourceError, match="not a data source"):
        src.open_source(tmp_path / "m.json")
    with pytest.raises(SourceNotFoundError) as e:
        src.open_source(tmp_path / "nope.jsonl")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_rows_sharing_a_key_merge_and_two_images_under_one_key_fail(tmp_path):
    m = jsonl(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": "one", "label": "cat", "id": 1},
            {"image": "b.png", "caption": "other"},
            {"image": "a.png", "caption": "two", "id": 2, "extra": True},
        ],
    )
    a, b = src.read_manifest(m)
    assert a.captions == ("one", "two") and a.metadata == {"label": "cat", "id": 1, "extra": True}
    assert a.origin.endswith("m.jsonl:1")
    jsonl(m, [{"image": "a.png", "key": "k"}, {"image": "b.png", "key": "k"}])
    with pytest.raises(SourceError, match=r"m\.jsonl:2: key 'k' names .*b\.png, but .*m\.jsonl:1"):
        src.read_manifest(m)


def test_folder_sidecars_hidden_files_and_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("z.png", "b/a.png", "b.png", ".hidden.png", "._z.png", ".cache/x.png"):
        (tmp_path / name).write_bytes(png())
    (tmp_path / "z.txt").write_text("a cat\n\n a kitten \n")
    (tmp_path / "z.json").write_text('{"label": "cat", "caption": "not used: .txt wins"}')
    (tmp_path / "b.json").write_text('{"captions": ["from json"], "w": 16}')
    got = src.read_folder(tmp_path)
    assert [s.key for s in got] == ["b/a.png", "b.png", "z.png"]
    b_a, b, z = got
    assert z.captions == ("a cat", "a kitten") and z.metadata == {"label": "cat"}
    assert b.captions == ("from json",) and b.metadata == {"w": 16}
    assert b_a.captions == () and b_a.metadata == {}
    (tmp_path / "b.json").write_text("[1, 2]")
    with pytest.raises(SampleError, match=r"b\.png: its \.json sidecar holds a list"):
        src.read_folder(tmp_path)


def test_folder_lists_phone_and_camera_formats(tmp_path):
    # HEIC, AVIF and camera RAW are images to every folder walk (read_folder, `index add FOLDER`, `index sync`),
    # in any case; their bytes are only read when decoded, so empty files do for the listing.
    for name in ("IMG_1.HEIC", "b.avif", "c.dng", "d.cr2", "e.nef", "f.arw", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert [s.key for s in src.read_folder(tmp_path)] == [
        "IMG_1.HEIC",
        "b.avif",
        "c.dng",
        "d.cr2",
        "e.nef",
        "f.arw",
    ]
    from clipforge.index import files

    walked = {Path(p).name: reason for p, reason in files.walk([tmp_path])}
    assert walked == {n: None for n in ("IMG_1.HEIC", "b.avif", "c.dng", "d.cr2", "e.nef", "f.arw")} | {
        "notes.md": "not an image"
    }


def test_source_kinds(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "0.tar", [])
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    (tmp_path / "emb" / "metadata").mkdir()
    jsonl(tmp_path / "m.jsonl", [{"image": "imgs/a.png"}])
    kinds = {n: src.source_kind(tmp_path / n) for n in ("imgs", "shards", "shards/0.tar", "emb", "m.jsonl")}
    assert kinds == {
        "imgs": "folder",
        "shards": "shards",
        "shards/0.tar": "shards",
        "emb": "embeddings",
        "m.jsonl": "manifest",
    }
    assert src.source_kind(tmp_path / "imgs" / "a.png") == "image"
    assert src.source_kind("https://example.invalid/{000..009}.tar") == "shards"
    with pytest.raises(SourceError, match="embedding folder"):
        src.open_source(tmp_path / "emb")  # a stage that needs images refuses vectors
    (tmp_path / "shards" / "stray.jpg").write_bytes(b"x")
    with pytest.raises(SourceError, match="both .tar shards and images"):
        src.source_kind(tmp_path / "shards")
    with pytest.raises(SourceError, match="cannot mix"):
        src.open_source([tmp_path / "m.jsonl", tmp_path / "shards" / "0.tar"])


# ------------------------------------------------------------------------------------------------- shards


def test_local_and_streamed_shards_give_the_same_samples(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("__meta__/info.json", b"{}"),  # skipped, as webdataset skips it
            ("a.jpg", png(1)),
            ("a.txt", b"one\ntwo\n"),
            ("a.json", b'{"n": 1, "caption": "x"}'),
            ("dir/b.c.PNG", png(2)),  # key dir/b, extension c.png: not an image member
            ("dir/b.webp", png(3)),
            ("dir/b.json", b'{"caption": "from json"}'),
            ("nothing.txt", b"no image"),
            ("d.png", png(4)),
        ],
    )
    errors: list[Exception] = []
    local = list(src.shard_samples(str(shard), errors.append))
    assert [type(e) for e in errors] == [SampleError] and "s.tar/nothing" in str(errors[0])
    assert [s.key for s in local] == ["s.tar/a", "s.tar/dir/b", "s.tar/d"]
    assert all(isinstance(s.image, Member) for s in local)
    assert [s.captions for s in local] == [("one", "two"), ("from json",), ()]
    assert [s.metadata for s in local] == [{"n": 1}, {}, {}]
    assert local[1].read() == png(3)
    from clipforge.data import tars

    streamed = []
    for rec in tars.iter_records([str(shard)], lambda e: False):
        try:
            streamed.append(tars.record_sample(rec))
        except SampleError:
            pass
    assert streamed == [Sample(s.key, s.read(), s.captions, s.metadata) for s in local]
    with pytest.raises(SampleError, match="nothing"):
        list(src.shard_samples(str(shard)))  # no on_error: the first bad record raises


def test_role_items_deal_every_item_once():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3):
            for workers in (0, 1, 2, 4):
                seen = []
                for rank in range(world):
                    roles = src.role_items(n, rank, world, workers)
                    seen += [i for r in roles for i in r]
                assert sorted(seen) == list(range(n))


def test_iter_samples_split_by_rank_and_worker(tmp_path):
    rows = [{"image": f"{i}.png", "caption": str(i)} for i in range(7)]
    m = jsonl(tmp_path / "m.jsonl", rows)
    for i in range(5):
        write_tar(tmp_path / f"{i}.tar", [(f"k{i}.png", png(i)), (f"k{i}.txt", b"c")])
    shards = [tmp_path / f"{i}.tar" for i in range(5)]
    everything = [s.key for s in src.iter_samples([m, *shards])]
    assert everything == [f"{i}.png" for i in range(7)] + [f"{i}.tar/k{i}" for i in range(5)]
    parts = [
        [s.key for s in src.iter_samples([m, *shards], rank=r, world_size=2, worker=w, workers=2)]
        for r in range(2)
        for w in range(2)
    ]
    assert sorted(k for p in parts for k in p) == sorted(everything)
    assert parts[0][:2] == ["0.png", "4.png"]  # rank 0 reads 0, 2, 4, 6; its worker 0 every other one


# --------------------------------------------------------------------------------------- embedding folders


def test_clip_retrieval_embedding_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "emb"
    for d in ("img_emb", "text_emb", "metadata"):
        (out / d).mkdir(parents=True)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float16)
    for i, (a, b) in enumerate([(0, 3), (3, 5)]):
        np.save(out / "img_emb" / f"img_emb_{i}.npy", x[a:b])
        np.save(out / "text_emb" / f"text_emb_{i}.npy", x[a:b])
        rows = {"image_path": [f"/p/{j}.jpg" for j in range(a, b)], "caption": [f"c{j}" for j in range(a, b)]}
        rows["url"] = [None if j == 1 else f"u{j}" for j in range(a, b)]
        pq.write_table(pa.table(rows), out / "metadata" / f"metadata_{i}.parquet")
    parts = list(src.read_embeddings(out))
    assert [p.keys for p in parts] == [["/p/0.jpg", "/p/1.jpg", "/p/2.jpg"], ["/p/3.jpg", "/p/4.jpg"]]
    assert parts[0].captions[2] == ("c2",) and parts[0].metadata[:2] == [{"url": "u0"}, {}]
    assert np.array_equal(np.concatenate([p.vectors for p in parts]), x)
    assert isinstance(parts[0].vectors, np.memmap) and parts[1].text_vectors.shape == (2, 4)
    np.save(out / "img_emb" / "img_emb_1.npy", x[:1])
    with pytest.raises(SourceError, match="part 1: vectors of shape"):
        list(src.read_embeddings(out))


def test_embed_output_reads_as_the_index_reads_it(tmp_path):
    from clipforge.index import embed_output as eo

    out = tmp_path / "emb"
    header = {"format": eo.FORMAT, "model": {"model": "m"}, "dim": 3, "dtype": "float32", "part_size": 2}
    header.update({"parts": 2, "count": 3, "captions": False, "input": "x"})
    eo.prepare(out, header)
    x = np.eye(3, dtype=np.float32)
    rows = [{"image_path": f"s.tar/{i}", "caption": None, "sha256": str(i), "n": i} for i in range(3)]
    eo.write_part(out, 0, 2, x[:2], None, rows[:2], [], "float32")
    with pytest.raises(SourceError, match=r"unfinished: parts \['1'\]"):
        list(src.read_embeddings(out))
    eo.write_part(out, 1, 2, x[2:], None, rows[2:], [], "float32")
    ours = list(src.read_embeddings(out))
    assert [p.keys for p in ours] == [["s.tar/0", "s.tar/1"], ["s.tar/2"]]
    assert [m for p in ours for m in p.metadata] == [{"sha256": str(i), "n": i} for i in range(3)]
    assert [p.captions for p in ours] == [[(), ()], [()]]
    assert np.array_equal(np.concatenate([p.vectors for p in ours]), x)
    assert src.open_source(out, embeddings=True) == ("embeddings", [str(out)])


# --------------------------------------------------------------------------- one sample, every stage


def _rgba_png() -> tuple[bytes, np.ndarray]:
    """An 8x6 PNG, left half transparent red, right half opaque blue; and its pixels on white."""
    a = np.zeros((6, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 0)
    a[:, 4:] = (0, 0, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(a, "RGBA").save(buf, format="PNG")
    upright = np.where(a[..., 3:] == 255, a[..., :3], 255).astype(np.uint8)
    return buf.getvalue(), upright


def _rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """An 8x4 JPEG whose EXIF says "rotate 90 degrees"; and its pixels upright (4x8)."""
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :2] = 255  # a white band at the left, so the rotation shows
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95, exif=exif)
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    upright = np.asarray(decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    return buf.getvalue(), upright


IMAGES = ["0.png", "1.jpg", "2.png"]
CAPTIONS = [("a red square", "a square, red"), ("a blue circle",), ("a green triangle", "green, pointing up")]
LABELS = ["red", "blue", "green"]
KEYS = {"jsonl": [f"img/{n}" for n in IMAGES], "folder": IMAGES, "shards": ["0.tar/0", "0.tar/1", "0.tar/2"]}
KEYS["csv"] = KEYS["tsv"] = KEYS["jsonl"]
KINDS = list(KEYS)


@pytest.fixture(scope="module")
def same_lines(tmp_path_factory) -> tuple[dict[str, Path], list[np.ndarray]]:
    """The same three samples as JSONL, CSV, TSV, a folder of images with sidecars and a local shard, each
    written the way its format allows (a caption field that the rule must pass over, rows sharing a key, a
    .json sidecar whose caption the .txt overrides); and the upright pixels each image must decode to: a
    transparent PNG (on white), a JPEG with an EXIF rotation (turned upright), a plain PNG."""
    root = tmp_path_factory.mktemp("lines")
    (root / "img").mkdir()
    (root / "shards").mkdir()
    plain = png(2)
    (rgba, rgba_px), (jpeg, jpeg_px) = _rgba_png(), _rotated_jpeg()
    data = [rgba, jpeg, plain]
    pixels = [rgba_px, jpeg_px, np.asarray(Image.open(io.BytesIO(plain)).convert("RGB"))]
    members = []
    for name, d, caps, label in zip(IMAGES, data, CAPTIONS, LABELS):
        stem = name.split(".")[0]
        side = json.dumps({"label": label, "caption": "not this: the .txt comes first"}).encode()
        files = {name: d, f"{stem}.txt": "\n".join(caps).encode(), f"{stem}.json": side}
        for n, b in files.items():
            (root / "img" / n).write_bytes(b)
        members += list(files.items())
    write_tar(root / "shards" / "0.tar", members)
    rows = [
        {"image": "img/0.png", "captions": list(CAPTIONS[0]), "caption": "not this", "label": "red"},
        {"image": "img/1.jpg", "caption": CAPTIONS[1][0], "text": "nor this", "label": "blue"},
        {"image": "img/2.png", "text": CAPTIONS[2][0], "label": "green"},
        {"image": "img/2.png", "captions": [CAPTIONS[2][1]]},  # a second row for the same image
    ]
    jsonl(root / "m.jsonl", rows)
    table = [("image", "caption", "caption_2", "label")]
    table += [("img/0.png", "|".join(CAPTIONS[0]), "", "red"), ("img/1.jpg", CAPTIONS[1][0], "", "blue")]
    table += [("img/2.png", CAPTIONS[2][0], CAPTIONS[2][1], "green")]
    for name, delim in (("m.csv", ","), ("m.tsv", "\t")):
        with open(root / name, "w", newline="") as f:
            csv.writer(f, delimiter=delim).writerows(table)
    names = {"jsonl": "m.jsonl", "csv": "m.csv", "tsv": "m.tsv", "folder": "img", "shards": "shards"}
    return {k: root / v for k, v in names.items()}, pixels


@pytest.mark.parametrize("kind", KINDS)
def test_the_reader_sees_the_same_samples_in_every_format(same_lines, kind):
    paths, pixels = same_lines
    got = list(src.iter_samples(paths[kind]))
    assert [s.key for s in got] == KEYS[kind]
    assert [s.captions for s in got] == CAPTIONS
    assert [s.metadata for s in got] == [{"label": lab} for lab in LABELS]
    assert [np.asarray(s.load()).tolist() for s in got] == [p.tolist() for p in pixels]


def _stage_views(source: Path) -> dict[str, dict[str, list]]:
    """What training, evaluation and indexing each see of `source`: keys, captions, labels and the
    preprocessed pixels (3, S, S) of every sample, read by each stage's own entry point."""
    from clipforge.data.loader import build_loader
    from clipforge.eval.manifest import captions_of, read_labelled_manifest
    from clipforge.index.embed import decode_item
    from clipforge.index.sources import list_items
    from clipforge.train.vocab import read_captions

    pre = Preprocess(CFG)
    tok = clipforge.train_tokenizer(["a red square blue circle green triangle"] * 4, 520, context_length=8)
    batches = list(
        build_loader(
            source, preprocess_cfg=CFG, tokenizer=tok, batch_size=2, train=False, workers=0, return_meta=True
        )
    )
    rows = read_labelled_manifest(source, required=("image", "label"))
    items = list_items(source)
    return {
        "training": {
            "keys": [k for _, _, m in batches for k in m.keys],
            "first captions": [c for _, _, m in batches for c in m.captions],
            "captions": read_captions([source]),  # the vocabulary's pass over the same data
            "pixels": [x for xs, _, _ in batches for x in xs],
        },
        "evaluation": {
            "keys": [r["key"] for r in rows],
            "first captions": [captions_of(r)[0] for r in rows],
            "captions": [c for r in rows for c in captions_of(r)],
            "labels": [r["label"] for r in rows],
            "pixels": [pre(r["image"]) for r in rows],
        },
        "indexing": {
            "keys": [it.key for it in items],
            "first captions": [it.caption for it in items],
            "labels": [it.metadata["label"] for it in items],
            "pixels": [decode_item(it, pre)[0] for it in items],
        },
    }


@pytest.mark.parametrize("kind", KINDS)
def test_training_evaluation_and_indexing_see_the_same_samples(same_lines, kind):
    """The same lines reach every stage as the same samples: keys, every caption by the one caption rule
    (captions, then caption, then text; .txt before .json; rows of one key merged), labels, and pixels
    decoded by the one decoder (EXIF upright, transparency on white) and preprocessed alike."""
    paths, pixels = same_lines
    views = _stage_views(paths[kind])
    # The index keys a file by its absolute path (as the collection stores files), a shard member as read.
    files = kind != "shards"
    index_keys = [str(paths["jsonl"].parent / "img" / n) for n in IMAGES] if files else KEYS[kind]
    expected = {
        "keys": KEYS[kind],
        "first captions": [c[0] for c in CAPTIONS],
        "captions": [c for caps in CAPTIONS for c in caps],
        "labels": LABELS,
        "pixels": [Preprocess(CFG)(Image.fromarray(p)) for p in pixels],
    }
    for stage, view in views.items():
        for what, got in view.items():
            want = index_keys if (stage, what) == ("indexing", "keys") else expected[what]
            if what == "pixels":
                assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), stage
            else:
                assert got == want, f"{stage} reads the {what} of {kind} differently"


def test_collection_add_decodes_as_the_other_stages(same_lines):
    """Collection.add decodes files with index.files.decode: the one decoder, not a second one."""
    from clipforge.index import files

    paths, pixels = same_lines
    for name, want in zip(IMAGES, pixels):
        got = files.decode(files.read(str(paths["folder"] / name)))
        assert np.array_equal(np.asarray(got), want), name


def test_sample_load_is_the_one_decoder(tmp_path):
    """Samples decode through transforms.load_image: EXIF orientation and alpha on white, for files and
    shard members alike."""
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    write_tar(tmp_path / "s.tar", [("t.png", buf.getvalue())])
    (s,) = src.shard_samples(str(tmp_path / "s.tar"))
    assert s.load().getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="s.tar/t: 4x2 = 8 pixels exceeds"):
        s.load(max_pixels=7)
