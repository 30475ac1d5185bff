"""The core sub-commands, run in-process through clipforge.cli.main and once as `python -m clipforge`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model, write_file_writer_archive
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.cli import main
from clipforge.cli.common import to_json
from clipforge.data.synthetic import shape_samples
from clipforge.encoder import Encoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_tiny_model(d / "m")
    for i, s in enumerate(shape_samples(3)):
        s.image.save(d / f"img{i}.png")
    return d


def run_json(capsys, args):
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json(capsys, model_dir):
    info = run_json(capsys, ["info", str(model_dir / "m"), "--json"])
    assert info["config"]["vision"]["image_size"] == 32
    model = clipforge.load(model_dir / "m")[0]
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())


def test_embed_text_and_image_match_the_encoder(capsys, model_dir):
    enc = Encoder.load(model_dir / "m")
    out = run_json(
        capsys, ["embed-text", "a red circle", "a blue square", "--model", str(model_dir / "m"), "--json"]
    )
    got = np.array([item["embedding"] for item in out["items"]])
    np.testing.assert_allclose(got, enc.embed_texts(["a red circle", "a blue square"]), atol=1e-6)
    images = [str(model_dir / f"img{i}.png") for i in range(3)]
    out = run_json(capsys, ["embed-image", *images, "-m", str(model_dir / "m"), "--json"])
    assert [item["image"] for item in out["items"]] == images
    got = np.array([item["embedding"] for item in out["items"]])
    np.testing.assert_allclose(got, enc.embed_images(images), atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_embed_to_npy(capsys, model_dir, tmp_path):
    out = tmp_path / "v.npy"
    run_json(capsys, ["embed-text", "x", "y", "-m", str(model_dir / "m"), "--out", str(out), "--json"])
    assert np.load(out).shape == (2, 128)


def test_convert_to_openai_and_back(capsys, model_dir, tmp_path):
    run_json(
        capsys,
        ["convert", str(model_dir / "m"), "--out", str(tmp_path / "w.pt"), "--format", "openai", "--json"],
    )
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "token_embedding.weight" in sd and "visual.proj" in sd
    run_json(
        capsys,
        [
            "convert",
            str(tmp_path / "w.pt"),
            "--out",
            str(tmp_path / "back"),
            "--activation",
            "gelu",
            "--vocab",
            str(model_dir / "m"),
            "--json",
        ],
    )
    a, b = clipforge.load(model_dir / "m")[0], clipforge.load(tmp_path / "back")[0]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))


def test_bad_image_is_one_line_error(capsys, model_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert main(["embed-image", str(tmp_path / "broken.png"), "-m", str(model_dir / "m")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "Traceback" not in err


def one_line_error(capsys, args, *needles):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in captured.err, captured.err


def test_info_on_a_file_writing_torchscript_archive_writes_nothing(capsys, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    write_file_writer_archive(tmp_path / "ViT-B-32.pt", victim)
    one_line_error(capsys, ["info", str(tmp_path / "ViT-B-32.pt")], "ViT-B-32.pt", "__setstate__")
    assert victim.read_text() == "precious data\n"


@pytest.mark.parametrize(
    "name, change, needle",
    [
        ("clipforge.json", (["config", "vision", "image_size"], "abc"), "config.vision.image_size"),
        ("clipforge.json", (["config", "text"], []), "config.text must be a JSON object"),
        ("clipforge.json", b"\xff\xfe{", "unreadable JSON"),
        ("config.json", (["vision_config", "patch_size"], "8"), "vision_config.patch_size"),
        ("config.json", b'{"text_config": \xff}', "unreadable JSON"),
    ],
)
def test_info_on_malformed_config_names_file_and_field(capsys, model_dir, tmp_path, name, change, needle):
    d = tmp_path / "m"
    shutil.copytree(model_dir / "m", d)
    if name == "config.json":
        (d / "clipforge.json").unlink()  # a plain Hugging Face directory
    if isinstance(change, bytes):
        (d / name).write_bytes(change)
    else:
        (*keys, last), value = change
        doc = json.loads((d / name).read_text())
        parent = doc
        for key in keys:
            parent = parent[key]
        parent[last] = value
        (d / name).write_text(json.dumps(doc))
    one_line_error(capsys, ["info", str(d), "--json"], f"{name}:", needle)


def test_json_output_is_strict_when_embeddings_overflow(capsys, model_dir, tmp_path):
    """Finite weights can still overflow float32 (a projection of 1e38s): the vectors turn NaN, and --json must
    still print JSON that any reader parses: null for each non-finite number, and a warning."""
    d = tmp_path / "m"
    shutil.copytree(model_dir / "m", d)
    weights = load_file(str(d / "model.safetensors"))
    weights["text_projection.weight"] = torch.full_like(weights["text_projection.weight"], 3e38)
    save_file(weights, str(d / "model.safetensors"))
    assert main(["embed-text", "a red circle", "--model", str(d), "--json"]) == 0
    captured = capsys.readouterr()

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    out = json.loads(captured.out, parse_constant=refuse)
    embedding = out["items"][0]["embedding"]
    assert None in embedding and all(v is None or math.isfinite(v) for v in embedding)
    assert "written as null, the first at items[0].embedding[" in captured.err


def test_to_json_turns_non_finite_numbers_into_null(capsys):
    text = to_json({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": "NaN"})
    assert json.loads(text) == {"a": [1.0, None], "b": {"c": None}, "d": "NaN"}
    assert "2 NaN or infinite number(s) written as null, the first at a[1]" in capsys.readouterr().err


def test_module_entry_point_help():
    src = str(Path(clipforge.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "clipforge", "--help"], capture_output=True, text=True, check=True, env=env
    )
    for command in ("info", "convert", "embed-text", "embed-image"):
        assert command in out.stdout
