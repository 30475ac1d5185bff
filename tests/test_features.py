"""Locked-tower training from the feature cache: which weights a head owns, the cache's keys and crash safety,
the batch order against the loader's, and runs from the cache against runs that compute the trunks every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import MICRO, max_diff, micro_model, params, tiny_cfg

import clipforge
from clipforge.data.manifest import read_manifest
from clipforge.data.synthetic import write_shapes
from clipforge.model import CLIPConfig, create_model
from clipforge.train import features as ft
from clipforge.train import locked, train
from clipforge.train.config import TrainConfig

N = 48


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), N, size=32)


@pytest.fixture(scope="module")
def vocab(shapes, tmp_path_factory) -> Path:
    """One vocabulary for every run here, so runs differ only in what a test changes."""
    captions = [c for s in read_manifest(shapes) for c in s.captions]
    path = tmp_path_factory.mktemp("vocab")
    clipforge.train_tokenizer(captions, 600, context_length=16).save(path)
    return path


def lit_cfg(out: Path, shapes: Path, vocab: Path, cache: str | Path, **kw):
    base = dict(
        data=(str(shapes),), vocab=str(vocab), lock_image=True, lock_text=True, feature_cache=str(cache)
    )
    return tiny_cfg(out, **{**base, **kw})


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def locked_model(vocab: Path, unlocked: int = 0):
    """The micro model with both towers locked (`unlocked` top blocks trainable), and its tokenizer."""
    tok = clipforge.Tokenizer.from_pretrained(vocab, context_length=16)
    cfg = CLIPConfig.from_dict(MICRO).replace(
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    model = create_model(cfg, seed=0)
    locked.lock_towers(
        model,
        TrainConfig(lock_image=True, lock_text=True, unlock_text_blocks=unlocked),
        tok,
    )
    return model, tok


# --- the head's weights --------------------------------------------------------------------------------


def test_head_parameters_are_the_projection_and_the_unlocked_blocks():
    from test_model import random_tokens, small_config

    for kind in ("vit", "resnet"):
        model = create_model(small_config(kind), seed=0)
        size = model.config.vision.image_size
        tokens = random_tokens(2, model.config)
        for tower, example in ((model.visual, torch.zeros(1, 3, size, size)), (model.text, tokens)):
            names = {id(p): n for n, p in tower.named_parameters()}
            for n in range(tower.num_blocks + 1):
                head = {names[id(p)] for p in locked.head_parameters(tower, example, n)}
                top = {
                    x
                    for x in names.values()
                    if x.startswith("transformer.") and int(x.split(".")[2]) >= 2 - n
                }
                if tower is model.text:
                    expected = {"text_projection"} | (
                        {"ln_final.weight", "ln_final.bias"} | top if n else set()
                    )
                elif kind == "vit":
                    expected = {"proj"} | ({"ln_post.weight", "ln_post.bias"} | top if n else set())
                else:
                    pool = {x for x in names.values() if x.startswith("attnpool.")}
                    expected = pool if n else {"attnpool.c_proj.weight", "attnpool.c_proj.bias"}
                assert head == expected, (kind, type(tower).__name__, n)
            assert all(p.requires_grad for p in tower.parameters())  # the probe leaves the model as it was


# --- keys: exactly the affected entries are recomputed ---------------------------------------------------


def build_images(root: Path, model, samples, **kw):
    store = ft.image_store(root, model.visual, model.config, 0)
    return store, *ft.build_image_features(store, model.visual, 0, samples, model.config.preprocess, **kw)


def test_image_cache_recomputes_exactly_what_changed(shapes, vocab, tmp_path):
    model, _ = locked_model(vocab)
    samples = read_manifest(shapes)
    store, keys, stats = build_images(tmp_path, model, samples)
    assert (stats.computed, stats.cached, stats.bad) == (N, 0, 0)
    parts = store.parts()
    before = store.read(keys)[0]

    store2, keys2, stats = build_images(tmp_path, model, samples)  # a second build reads, computes nothing
    assert store2.dir == store.dir and (stats.computed, stats.cached) == (0, N) and store.parts() == parts
    assert keys2 == keys

    # Another image in one file: that file's row only.
    changed = samples[5].image
    Image.new("RGB", (32, 32), (10, 200, 30)).save(changed)
    _, keys3, stats = build_images(tmp_path, model, samples)
    assert (stats.computed, stats.cached) == (1, N - 1)
    assert [i for i, (a, b) in enumerate(zip(keys, keys3)) if a != b] == [5]
    after = store.read(keys3)[0]
    assert torch.equal(after[:5], before[:5]) and torch.equal(after[6:], before[6:])
    expected = model.visual.trunk(ft.decode([samples[5]], ft.Preprocess(model.config.preprocess)))
    torch.testing.assert_close(after[5:6], expected.detach())

    # The head trains: its weights are not part of the key.
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    assert build_images(tmp_path, model, samples)[2].computed == 0
    # Other preprocessing, or other trunk weights: a new namespace, every row computed.
    other = model.config.replace(preprocess={"mean": (0.5, 0.5, 0.5)})
    store_p = ft.image_store(tmp_path, model.visual, other, 0)
    stats = ft.build_image_features(store_p, model.visual, 0, samples, other.preprocess)[1]
    assert store_p.dir != store.dir and stats.computed == N
    with torch.no_grad():
        model.visual.conv1.weight.mul_(1.01)
    store_w, _, stats = build_images(tmp_path, model, samples)
    assert store_w.dir not in (store.dir, store_p.dir) and stats.computed == N


def test_text_cache_keys_rows_by_caption_and_tokenizer(vocab, tmp_path):
    model, tok = locked_model(vocab, unlocked=1)
    captions = ["a red circle", "a blue square", "a red circle", "a green star"]
    store = ft.text_store(tmp_path, model.text, model.config, tok, 1)
    keys, stats = ft.build_text_features(store, model.text, 1, captions, tok)
    assert (stats.computed, keys[0] == keys[2]) == (3, True)
    hidden, pos = store.read(keys)
    assert hidden.shape == (4, 16, 64)  # full-length states: one shape for every caption
    with torch.no_grad():
        torch.testing.assert_close(model.text.head((hidden, pos), 1), model.text(tok(captions)))
    captions[3] = "a green triangle"
    stats = ft.build_text_features(store, model.text, 1, captions, tok)[1]
    assert (stats.computed, stats.cached) == (1, 2)  # distinct captions: two stored, one new
    # Another tokenizer (here: another context length) gives other ids: another namespace.
    other = clipforge.Tokenizer.from_pretrained(vocab, context_length=12)
    unused = ft.text_store(tmp_path, model.text, model.config, other, 1)
    assert unused.dir != store.dir
    # A lookup writes nothing: a namespace's folder appears with its first rows (a read-only cache works).
    assert unused.index() == {} and not unused.dir.exists()


# --- crash safety ----------------------------------------------------------------------------------------


def test_killed_build_keeps_finished_parts_and_resumes(shapes, vocab, tmp_path, monkeypatch):
    model, _ = locked_model(vocab)
    samples = read_manifest(shapes)
    clean_store, clean_keys, _ = build_images(tmp_path / "clean", model, samples)
    reference = clean_store.read(clean_keys)[0]

    store = ft.image_store(tmp_path / "killed", model.visual, model.config, 0)
    calls, trunk = [0], model.visual.trunk

    def dies_on_the_fourth_batch(x, unlocked=0):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt  # what Ctrl-C or a kill does between two batches
        return trunk(x, unlocked)

    monkeypatch.setattr(model.visual, "trunk", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        ft.build_image_features(
            store, model.visual, 0, samples, model.config.preprocess, batch=8, part_rows=8
        )
    monkeypatch.undo()
    assert len(store.parts()) == 3 and len(store.index()) == 24
    assert not list(store.dir.glob(".*.tmp"))
    (store.dir / ".part-0123456789abcdef.tmp").write_bytes(b"half a part")  # a SIGKILL mid-write
    keys, stats = ft.build_image_features(store, model.visual, 0, samples, model.config.preprocess, batch=8)
    assert (stats.computed, stats.cached) == (N - 24, 24)
    assert keys == clean_keys and torch.equal(store.read(keys)[0], reference)


def test_damaged_part_is_a_named_error(shapes, vocab, tmp_path):
    model, _ = locked_model(vocab)
    store, _, _ = build_images(tmp_path, model, read_manifest(shapes)[:4])
    store.parts()[0].write_bytes(b"\x00" * 20)
    with pytest.raises(ft.FeatureCacheError, match="unreadable feature part.*delete it"):
        store.index()


# --- batches as the loader makes them ----------------------------------------------------------------------


def test_cached_batches_follow_the_loaders_order_and_captions(shapes, vocab):
    """Same samples, same captions, in the same batches, for each of 2 ranks, from a mid-epoch start."""
    from clipforge.data.loader import build_loader

    samples = read_manifest(shapes)
    tok = clipforge.Tokenizer.from_pretrained(vocab, context_length=16)
    captions = [c for s in samples for c in s.captions]
    for rank in (0, 1):
        batches = locked.FeatureBatches(
            [len(s.captions) for s in samples],
            lambda idx: [samples[i].key for i in idx.tolist()],
            lambda j: [captions[i] for i in j.tolist()],
            batch_size=8,
            rank=rank,
            world_size=2,
            seed=3,
            samples_per_epoch=None,
        )
        loader = build_loader(
            shapes,
            preprocess_cfg=CLIPConfig.from_dict(MICRO).preprocess,
            tokenizer=tok,
            batch_size=8,
            rank=rank,
            world_size=2,
            workers=0,
            seed=3,
            epoch=2,
            start_batch=1,
            return_meta=True,
        )
        ours = list(batches(2, 1))
        theirs = [(m.keys, m.captions) for _, _, m in loader]
        assert len(ours) == len(loader) == 2 and ours == theirs


# --- runs from the cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("unlocked,accum", [(0, 1), (1, 2)])
def test_run_from_cache_equals_run_computing_trunks(shapes, vocab, tmp_path, unlocked, accum):
    """Both towers locked: the loss at every step and the final weights match a run whose trunks run every
    step (feature_cache='off'), with top blocks unlocked and micro-batches too."""
    kw = dict(unlock_image_blocks=unlocked, unlock_text_blocks=unlocked, accum_steps=accum, batch_size=16)
    cached = train(lit_cfg(tmp_path / "cached", shapes, vocab, tmp_path / "cache", **kw))
    live = train(lit_cfg(tmp_path / "live", shapes, vocab, "off", **kw))
    assert f"image features: 0 cached, {N} computed" in (cached / "log.txt").read_text()
    a, b = losses(cached), losses(live)
    assert len(a) == 6 and a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ma, _, _ = clipforge.load(cached / "final")
    mb, _, _ = clipforge.load(live / "final")
    assert max_diff(params(ma), params(mb)) < 1e-5


def test_text_locked_alone_reads_captions_from_cache(shapes, vocab, tmp_path):
    """An image tower that trains reads the loader's (augmented) images; the captions come from the cache."""
    kw = dict(lock_image=False, unlock_text_blocks=1, steps=3)
    cached = train(lit_cfg(tmp_path / "cached", shapes, vocab, tmp_path / "cache", **kw))
    live = train(lit_cfg(tmp_path / "live", shapes, vocab, "off", **kw))
    assert "text features: 0 cached" in (cached / "log.txt").read_text()
    assert "image features" not in (cached / "log.txt").read_text()
    assert max(abs(x - y) for x, y in zip(losses(cached), losses(live))) < 1e-5


def test_cli_locked_run_keeps_trunks_bitwise_and_saves_a_full_model(shapes, vocab, tmp_path):
    from clipforge.cli import main

    run, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "train",
        "--model",
        str(micro_model(tmp_path)),
        "--data",
        str(shapes),
        "--vocab",
        str(vocab),
        "--out",
        str(run),
    ]
    args += ["--steps", "4", "--batch-size", "16", "--workers", "0", "--no-progress", "--lock-image"]
    args += ["--lock-text", "--unlock-text-blocks", "1", "--feature-cache", str(cache), "--device", "cpu"]
    assert main(args) == 0
    assert {p.name.split("-")[0] for p in cache.iterdir()} == {"image", "text"}
    final, _, _ = clipforge.load(run / "final")
    initial = create_model(final.config, seed=0)  # what the run started from
    a, b = params(initial), params(final)
    trained = {
        "visual.proj",
        "text.text_projection",
        "text.ln_final.weight",
        "text.ln_final.bias",
        "logit_scale",
    }
    trained |= {k for k in a if k.startswith("text.transformer.resblocks.1.")}
    assert all(torch.equal(a[k], b[k]) for k in a if k not in trained)  # locked trunks: bitwise unchanged
    assert all(not torch.equal(a[k], b[k]) for k in trained if "bias" not in k)


def test_embedding_from_the_cache_equals_running_the_image_tower(shapes, vocab, tmp_path):
    # `clipforge embed --feature-cache`: a locked image tower's cached trunk rows through the trained head give
    # the vectors the whole tower gives, and no image of the cached run is decoded or run through the trunk.
    import numpy as np

    from clipforge.encoder import Encoder
    from clipforge.index.embed import embed_to_folder

    run, cache = tmp_path / "run", tmp_path / "cache"
    train(lit_cfg(run, shapes, vocab, cache, steps=3, batch_size=16))
    model, preprocess, tok = clipforge.load(run / "final")
    enc = Encoder(model, preprocess, tok)
    embed_to_folder(shapes, enc, tmp_path / "full", dtype="float32", workers=0)
    rows = locked.CachedImageRows(cache, model)
    assert len(rows.shas) == N

    def no_trunk(pixels):
        assert len(pixels) == 0, "a cached image went through the tower"
        return np.zeros((0, enc.dim), np.float32)

    enc.embed_pixels = no_trunk
    embed_to_folder(shapes, enc, tmp_path / "cached", dtype="float32", workers=0, cached=rows)
    full, cached = (np.load(tmp_path / d / "img_emb" / "img_emb_0.npy") for d in ("full", "cached"))
    assert full.shape == cached.shape == (N, model.config.embed_dim)
    assert np.abs(full - cached).max() < 1e-5
    other = locked.CachedImageRows(cache, create_model(model.config, seed=1))  # another trunk: nothing cached
    assert not other.shas


def test_locking_errors_name_the_problem(shapes, vocab, tmp_path):
    from clipforge.data.shards import write_shards

    with pytest.raises(ValueError, match="unlock_text_blocks=1 needs lock_text"):
        tiny_cfg(tmp_path, unlock_text_blocks=1)
    with pytest.raises(ValueError, match="unlocked=3: the image tower has 2 unlockable blocks"):
        train(lit_cfg(tmp_path / "a", shapes, vocab, tmp_path / "c", unlock_image_blocks=3))
    write_shards(shapes, tmp_path / "shards", shard_size=16)
    with pytest.raises(ft.FeatureCacheError, match="shards are not supported"):
        train(lit_cfg(tmp_path / "b", tmp_path / "shards", vocab, tmp_path / "c"))


# --- two processes --------------------------------------------------------------------------------------


def _two_rank_worker(rank: int, port: int, cfg_json: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train(locked.TrainConfig.from_dict(json.loads(cfg_json)))


def test_two_processes_from_cache_equal_one_process(shapes, vocab, tmp_path):
    """Rank 0 builds the cache while rank 1 waits, then both read it; their global batch of 2 x 8 is the same
    samples and captions as one process's batch of 16, so the runs end with the same weights."""
    import socket

    import torch.multiprocessing as mp

    kw = dict(unlock_text_blocks=1, steps=3, checkpoint_every=3)
    one = train(lit_cfg(tmp_path / "one", shapes, vocab, tmp_path / "cache1", batch_size=16, **kw))
    two = lit_cfg(tmp_path / "two", shapes, vocab, tmp_path / "cache2", batch_size=8, **kw)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, json.dumps(two.to_dict()))
    mp.start_processes(_two_rank_worker, args=args, nprocs=2, join=True, start_method="spawn")
    assert f"image features: 0 cached, {N} computed" in (tmp_path / "two" / "log.txt").read_text()
    a, b = params(clipforge.load(one / "final")[0]), params(clipforge.load(tmp_path / "two" / "final")[0])
    assert max_diff(a, b) < 1e-5


def test_unreadable_images_are_left_out_up_to_max_bad_fraction(shapes, vocab, tmp_path):
    from clipforge.data.loader import BadDataError

    lines = shapes.read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    rows[0]["image"] = str(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[1]["image"] = str(tmp_path / "broken.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({**r, "image": str(shapes.parent / r["image"])}) + "\n" for r in rows)
    )
    with pytest.raises(BadDataError, match="2 of 48 samples are unreadable"):
        train(lit_cfg(tmp_path / "a", manifest, vocab, tmp_path / "cache", max_bad_fraction=0.0, steps=1))
    run = train(lit_cfg(tmp_path / "b", manifest, vocab, tmp_path / "cache", max_bad_fraction=0.1, steps=1))
    log = (run / "log.txt").read_text()
    assert "2 unreadable" in log and "left out 2 unreadable samples" in log and "cannot read" in log
