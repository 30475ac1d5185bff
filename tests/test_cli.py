"""The core sub-commands, run in-process through clipforge.cli.main and once as `python -m clipforge`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_model

import clipforge
from clipforge.cli import main
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


def test_module_entry_point_help():
    src = str(Path(clipforge.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-m", "clipforge", "--help"], capture_output=True, text=True, check=True, env=env
    )
    for command in ("info", "convert", "embed-text", "embed-image"):
        assert command in out.stdout
