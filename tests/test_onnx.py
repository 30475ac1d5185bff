"""ONNX export: the exported towers, run by onnxruntime through clipforge.load, match PyTorch to 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clipforge
from clipforge.checkpoint import load, save_model
from clipforge.cli import main
from clipforge.tokenizer import train_tokenizer

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CAPTIONS = ["a red circle", "a blue square on white", "a small green triangle", "two yellow stars"] * 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    tok = train_tokenizer(CAPTIONS, vocab_size=600, context_length=32)
    cfg = clipforge.get_config("tiny").replace(
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    model = clipforge.create_model(cfg, seed=0).eval()
    save_model(model, d / "model", tokenizer=tok)
    assert main(["export", "onnx", "--model", str(d / "model"), "--out", str(d / "onnx")]) == 0
    return model, tok, d / "onnx"


def test_export_directory_has_graphs_and_metadata(exported):
    _, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"image.onnx", "text.onnx", "clipforge.json", "preprocessor_config.json"} <= names
    assert json.loads((out / "clipforge.json").read_text())["format"] == "clipforge-onnx"


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch(exported, batch):
    model, tok, out = exported
    onnx_model, preprocess, onnx_tok = load(out)
    assert onnx_tok is not None and onnx_tok(["a red circle"]).tolist() == tok(["a red circle"]).tolist()
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    # mixed lengths: the host-side trimming must give the untrimmed tower's result
    tokens = tok(["a red circle", "two yellow stars on a blue square on white", "x"][:batch])
    with torch.no_grad():
        torch.testing.assert_close(
            onnx_model.encode_image(images), model.encode_image(images), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            onnx_model.encode_text(tokens), model.encode_text(tokens), atol=1e-4, rtol=0
        )
        li, _ = onnx_model.logits(images, tokens)
        ri, _ = model.logits(images, tokens)
    torch.testing.assert_close(li, ri, atol=1e-3, rtol=1e-4)


def test_onnx_rejects_overlong_text(exported):
    _, _, out = exported
    onnx_model, _, _ = load(out)
    with pytest.raises(ValueError, match="context length"):
        onnx_model.encode_text(torch.ones(1, 40, dtype=torch.long))


def test_encoder_and_cli_run_an_onnx_export(exported, capsys):
    """The numpy Encoder (used by search, apps and the CLI) runs an export like a PyTorch model."""
    from clipforge.encoder import Encoder

    model, tok, out = exported
    enc = Encoder.load(out)
    assert enc.identity["fingerprint"].startswith("sha256:") and enc.dim == model.config.embed_dim
    with torch.no_grad():
        ref = model.encode_text(tok(["a red circle"]), normalize=True).numpy()
    np.testing.assert_allclose(enc.embed_texts(["a red circle"]), ref, atol=1e-4)
    assert main(["embed-text", "a red circle", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == model.config.embed_dim


def test_onnx_export_refuses_a_wrong_vocabulary(exported, tmp_path):
    _, _, out = exported
    train_tokenizer(CAPTIONS[:3], vocab_size=520, context_length=32).save(tmp_path / "v")
    with pytest.raises(clipforge.CheckpointError, match="wrong vocabulary"):
        load(out, vocab=tmp_path / "v")


def test_export_leaves_the_callers_model_alone(exported, tmp_path):
    from clipforge.onnx_export import export_onnx

    model, tok, _ = exported
    half = clipforge.create_model(model.config, seed=0).to(torch.bfloat16)
    export_onnx(half, tmp_path / "x", tok)
    assert half.text.trim is True and next(half.parameters()).dtype == torch.bfloat16


def test_onnx_export_loads_one_tower(exported):
    model, tok, out = exported
    text_only, _, _ = clipforge.load(out, towers="text")
    assert text_only.image_session is None
    with torch.no_grad():
        ref = model.encode_text(tok(["a red circle"]))
    torch.testing.assert_close(text_only.encode_text(tok(["a red circle"])), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(clipforge.TowerNotLoadedError, match="without its image tower"):
        text_only.encode_image(torch.zeros(1, 3, 32, 32))
