"""Fuzz every checkpoint reader: whatever the bytes, `clipforge.load` returns a model or raises a named error
(CheckpointError, or FileNotFoundError for a file a config names), and writes nothing.

Inputs: random bytes under every weights suffix; torch.save and TorchScript archives truncated, flipped or with
a record garbled (one of them a TorchScript archive whose __setstate__ would overwrite a sentinel file);
clipforge.json, config.json and open_clip_config.json with fields replaced, deleted or added, or their bytes
broken; state dicts with names, shapes, dtypes and values changed. Bounded: a few dozen examples per test,
derandomized, the whole file in seconds.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_file_writer_archive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_checkpoint import script_openai_archive

import clipforge
from clipforge.checkpoint import CheckpointError, export_state_dict, save_model
from clipforge.model import CLIP

NAMED_ERRORS = (CheckpointError, FileNotFoundError)
FUZZ = settings(
    max_examples=50,
    deadline=10_000,  # ms; one load of the micro model takes well under a second
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# JSON values a config field may be replaced with. Integers stay small: a config may ask for any number of
# layers, and building a model of a million layers (on the meta device) takes minutes, which is not what this
# file tests.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-1e3, 1e3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid inputs to mutate, and a sentinel file outside every directory the fuzzer writes in."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    sentinel = tmp_path_factory.mktemp("outside") / "sentinel.txt"
    sentinel.write_text("must stay as it is\n")
    cfg = clipforge.get_config("tiny").replace(
        embed_dim=32,
        vision={"image_size": 16, "patch_size": 8, "width": 64, "layers": 1, "heads": 1},
        text={"vocab_size": 64, "sot_token_id": 62, "eot_token_id": 63, "context_length": 8}
        | {"width": 64, "heads": 1, "layers": 1},
    )
    model = clipforge.create_model(cfg, seed=0)
    save_model(model, root / "clipforge")
    openai = export_state_dict(model, "openai")
    torch.save(openai, root / "state_dict.pt")
    script_openai_archive({k: v.half() for k, v in openai.items()}, root / "scripted.pt")
    write_file_writer_archive(root / "writer.pt", sentinel)
    return {
        "dir": root / "clipforge",
        "meta": json.loads((root / "clipforge" / "clipforge.json").read_text()),
        "hf": json.loads((root / "clipforge" / "config.json").read_text()),
        "openai": openai,
        "archives": {n: (root / f"{n}.pt").read_bytes() for n in ("state_dict", "scripted", "writer")},
        "sentinel": (sentinel, sentinel.read_bytes(), sentinel.stat().st_mtime_ns),
    }


def check_load(path: Path, bases: dict, **kwargs) -> None:
    """A model whose weights are finite fp32, or a named error; and the sentinel untouched either way."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no vocabulary, a guessed activation
            model, _, _ = clipforge.load(path, **kwargs)
        assert isinstance(model, CLIP)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    except NAMED_ERRORS:
        pass
    finally:
        sentinel, content, mtime = bases["sentinel"]
        assert sentinel.read_bytes() == content and sentinel.stat().st_mtime_ns == mtime


def mutate_json(data: st.DataObject, doc: object) -> object:
    """One to three edits at random places in `doc`: a value replaced, a key deleted or a key added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        places = list(_places(doc))
        if not places:
            return data.draw(JSON_VALUES)
        container, key = data.draw(st.sampled_from(places))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            container[key] = data.draw(JSON_VALUES)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    return doc


def _places(doc: object):
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield doc, key
        yield from _places(value)


def json_bytes(data: st.DataObject, doc: dict) -> bytes:
    """The mutated document, or its bytes broken: truncated, garbled, or not UTF-8."""
    text = json.dumps(mutate_json(data, doc)).encode()
    how = data.draw(st.sampled_from(["edited", "edited", "truncated", "garbled", "utf-16"]))
    if how == "truncated":
        return text[: data.draw(st.integers(0, len(text)))]
    if how == "garbled":
        return _flip(data, text)
    return text.decode().encode("utf-16") if how == "utf-16" else text


def _flip(data: st.DataObject, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


def _garble_record(data: st.DataObject, blob: bytes) -> bytes:
    """The zip rebuilt with one record truncated, flipped, replaced by random bytes, or left out."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        records = {n: z.read(n) for n in z.namelist()}
    name = data.draw(st.sampled_from(sorted(records)))
    how = data.draw(st.sampled_from(["truncate", "flip", "replace", "drop"]))
    if how == "drop":
        del records[name]
    elif how == "truncate":
        records[name] = records[name][: data.draw(st.integers(0, max(len(records[name]) - 1, 0)))]
    elif how == "flip" and records[name]:
        records[name] = _flip(data, records[name])
    else:
        records[name] = data.draw(st.binary(max_size=256))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, record in records.items():
            z.writestr(n, record)
    return out.getvalue()


@FUZZ
@given(
    blob=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"PK\x03\x04" + b),  # a zip's magic, then anything
        st.binary(max_size=512).map(lambda b: b"\x80\x02" + b),  # a pickle's protocol header, then anything
    ),
    suffix=st.sampled_from([".pt", ".bin", ".pth", ".safetensors"]),
)
def test_random_bytes(bases, blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"weights{suffix}").write_bytes(blob)
        check_load(Path(tmp) / f"weights{suffix}", bases)


@FUZZ
@given(data=st.data())
def test_garbled_archives(bases, data):
    name = data.draw(st.sampled_from(sorted(bases["archives"])))
    blob = bases["archives"][name]
    how = data.draw(st.sampled_from(["truncate", "flip", "record", "record"]))  # records keep their CRCs
    if how == "truncate":
        blob = blob[: data.draw(st.integers(1, len(blob) - 1))]
    elif how == "flip":
        blob = _flip(data, blob)
    else:
        blob = _garble_record(data, blob)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.pt").write_bytes(blob)
        check_load(Path(tmp) / "model.pt", bases)


@FUZZ
@given(data=st.data())
def test_mutated_clipforge_json(bases, data):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(shutil.copytree(bases["dir"], Path(tmp) / "m"))
        (d / "clipforge.json").write_bytes(json_bytes(data, bases["meta"]))
        check_load(d, bases)


@FUZZ
@given(data=st.data())
def test_mutated_hugging_face_config(bases, data):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(shutil.copytree(bases["dir"], Path(tmp) / "m"))
        (d / "clipforge.json").unlink()  # a plain Hugging Face directory
        (d / "config.json").write_bytes(json_bytes(data, bases["hf"]))
        check_load(d, bases)


@FUZZ
@given(data=st.data())
def test_mutated_open_clip_config(bases, data):
    config = {"model_cfg": {"embed_dim": 32, "quick_gelu": True}, "preprocess_cfg": {"mean": [0.5] * 3}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_file(bases["openai"], str(d / "open_clip_model.safetensors"))
        (d / "open_clip_config.json").write_bytes(json_bytes(data, config))
        check_load(d, bases)


TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    fill=st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")]),
)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["pt", "safetensors"]), preset=st.sampled_from([None, "tiny"]))
def test_mutated_state_dicts(bases, data, fmt, preset):
    sd = dict(bases["openai"])
    names = sorted(sd)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        name = data.draw(st.sampled_from(names))
        if action == "replace":
            sd[name] = data.draw(TENSORS)
        elif action == "delete":
            sd.pop(name, None)
        else:
            sd[data.draw(st.sampled_from(names)) + data.draw(st.text(max_size=4))] = data.draw(TENSORS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"w.{fmt}"
        if fmt == "pt":
            torch.save(sd, path)
        else:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        check_load(path, bases, preset=preset)
