"""Fuzz the training inputs with Hypothesis: whatever a manifest or a checkpoint directory holds, training reads
correct samples and states or stops with one of the project's named errors, never another exception.

- Manifests: generated JSONL / CSV / TSV lines (random keys, value types, image paths that are good, missing,
  empty, garbage or folders, captions with any characters, several encodings) go through the reader and one
  epoch of the training loader.
- Checkpoints: two saved states, then generated damage (truncation, overwritten or flipped bytes, missing or
  garbled checksums, stray entries) before resuming: the newest intact checkpoint must come back exactly.

Bounded: few examples, a deadline per example, fixed seeds (derandomised), no example database; a few seconds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import clipforge
from clipforge.data.loader import BadDataError, build_loader
from clipforge.data.manifest import ManifestError, read_manifest
from clipforge.data.synthetic import shape_samples
from clipforge.model.config import PreprocessConfig
from clipforge.train.state import (
    CHECKSUM_FILE,
    STATE_FILE,
    Position,
    ResumeError,
    restore,
    resume_state,
    rng_state,
    save_state,
)

FUZZ = settings(
    max_examples=40,
    deadline=5000,  # ms per example; two busy cores
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CFG = PreprocessConfig(image_size=16)
IMAGES = ("good.png", "also good.png", "missing.png", "empty.png", "garbage.png", "folder.png")
GOOD = {"good.png", "also good.png"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with two good images, an empty one, a garbage one and a folder named like an image."""
    root = tmp_path_factory.mktemp("fuzz-data")
    shapes = shape_samples(2, size=20)
    shapes[0].image.save(root / "good.png")
    shapes[1].image.save(root / "also good.png")
    (root / "empty.png").write_bytes(b"")
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (root / "folder.png").mkdir()
    return root


@pytest.fixture(scope="module")
def tok():
    return clipforge.train_tokenizer(
        [c for s in shape_samples(24) for c in s.captions], 600, context_length=16
    )


# ------------------------------------------------------------------------------------------------ manifests

text = st.text(max_size=12)
caption = st.one_of(text, st.sampled_from(["a red circle", "  ", "", "a|b", 'say "hi", ok', "é\u0301\x00\n"]))
ABSOLUTE = "@DATA@/"  # replaced by the data folder when the manifest is written
named = st.sampled_from(IMAGES)
# An image path as a manifest may write it: relative or absolute, to a good or bad file, or odd text.
good = st.sampled_from(sorted(GOOD))
image_value = st.one_of(
    good, good.map(lambda n: ABSOLUTE + n), named, named.map(lambda n: ABSOLUTE + n), text
)
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), caption)
json_value = st.one_of(scalar, image_value, st.lists(st.one_of(caption, scalar), max_size=3))
# Well-formed rows (an image path and captions), so that many manifests hold some good samples ...
typed_row = st.fixed_dictionaries(
    {"image": image_value},
    optional={"caption": caption, "captions": st.lists(caption, max_size=3), "key": st.sampled_from("ab")},
).map(json.dumps)
# ... and anything else: random keys and value types, broken JSON.
wild_row = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(["image", "caption", "captions", "key"]), text), json_value, max_size=5
    ).map(json.dumps),
    st.lists(json_value, max_size=2).map(json.dumps),
    st.sampled_from(["{", "", "[]", "null", '{"image": "good.png", "caption": "cut']),
    text,
)
# Plausible manifests (the right structure, random content) three times as often as wild ones.
jsonl = st.one_of(
    st.lists(typed_row, min_size=1, max_size=6),
    st.lists(typed_row, min_size=1, max_size=6),
    st.lists(typed_row, min_size=1, max_size=6),
    st.lists(st.one_of(typed_row, wild_row), min_size=1, max_size=6),
).map(lambda lines: "\n".join(lines) + "\n")
COLUMNS = ["image", "filepath", "caption", "caption 2", "key", "note", ""]


def table(delimiter: str):
    """CSV/TSV text: a valid header and rows of its width, or any header and rows of about its width."""
    cell = st.one_of(image_value, caption)

    def rows(names: list[str], exact: bool):
        row = st.lists(cell, min_size=len(names) - (not exact), max_size=len(names) + (not exact))
        return st.lists(row, min_size=exact, max_size=6).map(lambda rs: _table([names, *rs], delimiter))

    plausible = st.permutations(["image", "caption", "note"]).flatmap(lambda h: rows(h, exact=True))
    wild = st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4).flatmap(lambda h: rows(h, exact=False))
    return st.one_of(plausible, plausible, plausible, wild)


def _table(rows: list[list[str]], delimiter: str) -> str:
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerows(rows)
    return out.getvalue()


# (suffix, text, encoding) of a generated manifest
manifests = st.tuples(
    st.one_of(
        st.tuples(st.just(".jsonl"), jsonl),
        st.tuples(st.just(".csv"), table(",")),
        st.tuples(st.just(".tsv"), table("\t")),
    ),
    st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"]),
).map(lambda x: (*x[0], x[1]))


def _write(files: Path, suffix: str, content: str, encoding: str) -> Path:
    m = files / f"manifest{suffix}"
    m.write_bytes(content.replace(ABSOLUTE, f"{files}/").encode(encoding, errors="replace"))
    return m


def _usable(s, files: Path) -> bool:
    """A sample the loader must be able to read: a good image file and at least one caption."""
    return s.captions != () and os.path.normpath(s.image) in {str(files.resolve() / g) for g in GOOD}


@FUZZ
@given(manifests)
def test_manifest_reader_gives_samples_or_a_manifest_error(files, generated):
    m = _write(files, *generated)
    try:
        samples = read_manifest(m)
    except ManifestError as e:
        assert str(m) in str(e)  # the message names the file
        event("ManifestError")
        return
    event(f"{generated[0]} samples")
    assert samples and len({s.key for s in samples}) == len(samples)
    for s in samples:
        assert isinstance(s.key, str) and isinstance(s.image, str)
        assert all(isinstance(c, str) and c and c == c.strip() for c in s.captions)


@FUZZ
@given(manifests, st.sampled_from([0.0, 0.5, 1.0]), st.integers(0, 3))
def test_training_loader_gives_correct_samples_or_a_named_error(
    files, tok, generated, max_bad_fraction, seed
):
    m = _write(files, *generated)
    try:
        samples = {s.key: s for s in read_manifest(m)}
    except ManifestError:
        event("ManifestError")
        return
    usable = any(_usable(s, files) for s in samples.values())
    loader = build_loader(
        m,
        preprocess_cfg=CFG,
        tokenizer=tok,
        batch_size=1,
        workers=0,
        seed=seed,
        max_bad_fraction=max_bad_fraction,
        return_meta=True,
    )
    try:
        batches = list(loader)
    except BadDataError as e:
        # Only too many bad samples (never with max_bad_fraction=1), or none usable at all.
        assert max_bad_fraction < 1 or not usable, e
        event("BadDataError")
        return
    event("an epoch of samples")
    assert usable and len(batches) == len(samples)  # batch size 1: one batch per sample, bad ones replaced
    for images, tokens, meta in batches:
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
        assert tokens.shape == (1, 16)
        (key,), (text,) = meta.keys, meta.captions
        assert _usable(samples[key], files) and text in samples[key].captions
    assert loader.stats.seen == len(batches) + loader.stats.bad


# ---------------------------------------------------------------------------------------------- checkpoints


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """A run directory with checkpoints at steps 3 and 6 (different weights and optimiser moments)."""
    run = tmp_path_factory.mktemp("fuzz-run")
    model, opt, scaler = _model(0)
    saved = {}
    for step in (3, 6):
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict()}
        save_state(run, Position(step, 0, step), {**state, "rng": [rng_state()], "world_size": 1}, keep=2)
        saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return run, saved


# Damage to one checkpoint directory: (file, operation, argument).
FILE_DAMAGE = st.tuples(
    st.sampled_from([STATE_FILE, CHECKSUM_FILE]),
    st.sampled_from(["truncate", "empty", "overwrite", "flip", "append", "delete", "folder"]),
    st.integers(0, 1 << 20),
)
STRAY = st.sampled_from(["step-99", "step-x", "step-7.bak", "step-٣", ".step-8.tmp"])


def _damage(d: Path, name: str, op: str, arg: int) -> None:
    f = d / name
    if not f.is_file():
        return
    data = f.read_bytes()
    if op == "truncate":
        f.write_bytes(data[: arg % max(1, len(data))])
    elif op == "empty":
        f.write_bytes(b"")
    elif op == "overwrite":
        f.write_bytes(random.Random(arg).randbytes(arg % 3000))
    elif op == "flip" and data:
        i = arg % len(data)
        f.write_bytes(data[:i] + bytes([data[i] ^ (1 + arg % 255)]) + data[i + 1 :])
    elif op == "append":
        f.write_bytes(data + b"\0junk" * (1 + arg % 5))
    elif op == "delete":
        f.unlink()
    elif op == "folder":
        f.unlink()
        f.mkdir()


def _status(d: Path, original: Path) -> str:
    """'intact': the state file as saved, its checksum as saved or gone; 'unknown': a changed state file
    whose checksum is gone (read unverified, as a checkpoint of an older version: it may load or not, but
    must not crash); 'bad': anything else."""
    state, sums = d / STATE_FILE, d / CHECKSUM_FILE
    if not state.is_file():
        return "bad"
    if not sums.exists():
        return "intact" if state.read_bytes() == (original / STATE_FILE).read_bytes() else "unknown"
    same = [
        sums.is_file() and (d / n).read_bytes() == (original / n).read_bytes()
        for n in (STATE_FILE, CHECKSUM_FILE)
    ]
    return "intact" if all(same) else "bad"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-resume")


@FUZZ
@given(
    st.dictionaries(st.sampled_from([3, 6]), st.lists(FILE_DAMAGE, max_size=3), max_size=2),
    st.lists(STRAY, max_size=2),
    st.booleans(),
)
def test_resume_gives_the_newest_intact_checkpoint_or_a_resume_error(
    pristine, workdir, damage, strays, legacy
):
    source, saved = pristine
    run = workdir / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source, run)
    root = run / "checkpoints"
    if legacy:  # checkpoints without checksums, as older versions wrote them: damage reaches torch.load
        for f in root.glob(f"step-*/{CHECKSUM_FILE}"):
            f.unlink()
    for step, ops in damage.items():
        for op in ops:
            _damage(root / f"step-{step}", *op)
    for name in strays:
        (root / name).mkdir(exist_ok=True)
    status = {s: _status(root / f"step-{s}", source / "checkpoints" / f"step-{s}") for s in (3, 6)}
    skipped: list[str] = []
    try:
        found = resume_state(run, "auto", skipped.append)
    except ResumeError:
        assert "intact" not in status.values()
        event("ResumeError")
        return
    assert found is not None
    path, pos, state = found
    step = int(path.name[5:])
    event(f"resumed from a checkpoint {status[step]}, {len(skipped)} skipped")
    newer = [s for s in (3, 6) if s > step]
    assert all(status[s] != "intact" for s in newer) and len(skipped) >= len(newer)
    model, opt, scaler = _model(1)
    if status[step] == "unknown":
        try:
            restore(path, state, model, opt, scaler, rank=0)
        except ResumeError:
            event("a damaged unverified state was refused when restored")
        return
    assert status[step] == "intact" and pos == Position(step, 0, step)
    restore(path, state, model, opt, scaler, rank=0)
    assert all(torch.equal(v, saved[step][k]) for k, v in model.state_dict().items())
