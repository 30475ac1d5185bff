"""Checkpoint interop: the clipforge directory loads in Hugging Face, foreign layouts load in clipforge with
identical outputs, and every malformed input is refused with an error naming what is wrong."""

from __future__ import annotations

import json
import pickle
import re
import warnings
import zipfile

import pytest
import torch
from conftest import require, write_file_writer_archive
from safetensors.torch import load_file, save_file

import clipforge
from clipforge.checkpoint import (
    CheckpointError,
    export_state_dict,
    load,
    read_checkpoint,
    read_state_dict,
    save_model,
    save_openai,
)
from clipforge.model import convert, create_model, get_config

CAPTIONS = [
    f"a {c} {o} on a {p}"
    for c in ("red", "green", "blue", "small", "large")
    for o in ("cat", "dog", "car", "tree", "house", "boat")
    for p in ("table", "street", "beach")
]


@pytest.fixture(scope="module")
def tok():
    return clipforge.train_tokenizer(CAPTIONS * 3, vocab_size=600, context_length=32)


def tiny_cfg(tok, kind="vit", activation="gelu"):
    vision = (
        {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "heads": 2}
        if kind == "vit"
        else {"kind": "resnet", "image_size": 64, "width": 16, "layers": (1, 1, 1, 1), "heads": 8}
    )
    return get_config("tiny").replace(
        embed_dim=64,
        activation=activation,
        vision=vision,
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
            "width": 128,
            "heads": 2,
            "layers": 2,
        },
    )


def outputs(model, tok, size):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tok(["a red cat on a table", "boat"]))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_save_load_round_trip_is_exact(tmp_path, tok, kind):
    cfg = tiny_cfg(tok, kind)
    cfg = cfg.replace(preprocess={"resize_mode": "squash", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    model = create_model(cfg, seed=0).eval()
    save_model(model, tmp_path / "m", tokenizer=tok)
    loaded, preprocess, tok2 = load(
        tmp_path / "m", channels_last=False
    )  # exact: the channels-last fast path reorders sums
    assert loaded.config == cfg
    assert preprocess.config == cfg.preprocess  # preprocessing travels with the weights
    for a, b in zip(outputs(model, tok, cfg.vision.image_size), outputs(loaded, tok2, cfg.vision.image_size)):
        assert torch.equal(a, b)
    meta = json.loads((tmp_path / "m" / "clipforge.json").read_text())
    assert meta["layout"] == ("hf" if kind == "vit" else "openai")
    assert (tmp_path / "m" / "config.json").exists() == (kind == "vit")


def test_a_failed_save_names_the_file_and_leaves_the_old_checkpoint_whole(tmp_path, tok, monkeypatch):
    import errno

    import clipforge.checkpoint.save as save_mod
    from clipforge.atomic import AtomicWriteError

    model = create_model(tiny_cfg(tok), seed=0).eval()
    save_model(model, tmp_path / "m", tokenizer=tok)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def full_disk(sd, name, metadata=None):
        open(name, "wb").write(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_mod, "save_file", full_disk)
    with pytest.raises(AtomicWriteError, match=r"cannot write .*model\.safetensors: No space left"):
        save_model(create_model(tiny_cfg(tok), seed=1), tmp_path / "m", tokenizer=tok)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # no temp file left


def test_clipforge_directory_loads_in_hugging_face(tmp_path, tok):
    transformers = require("transformers")
    cfg = tiny_cfg(tok, activation="quick_gelu")
    model = create_model(cfg, seed=1).eval()
    save_model(model, tmp_path / "m", tokenizer=tok)
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "m").eval()
    hf_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "m")
    texts = ["a red cat on a table", "green boat"]
    ids = hf_tok(texts, padding="max_length", max_length=32, return_tensors="pt")["input_ids"]
    ours = tok(texts)
    # HF pads with its pad token; ours pads with 0. Up to and including the end-of-text token they agree.
    for a, b in zip(ids, ours):
        n = int((b == tok.eot_token_id).nonzero()[0]) + 1
        assert a[:n].tolist() == b[:n].tolist()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ours, pixel_values=images).logits_per_image
        got, _ = model.logits(images, ours)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)


def test_hugging_face_directory_loads_in_clipforge(tmp_path, tok):
    transformers = require("transformers")
    cfg = tiny_cfg(tok, activation="quick_gelu")
    hf = transformers.CLIPModel(transformers.CLIPConfig(**convert.hf_config(cfg))).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    model, _, tok2 = load(tmp_path / "hf")
    assert model.config.activation == "quick_gelu" and tok2 is not None
    images = torch.randn(2, 3, 32, 32)
    tokens = tok(["a blue car", "a tree"])
    with torch.no_grad():
        torch.testing.assert_close(
            model.logits(images, tokens)[0],
            hf(input_ids=tokens, pixel_values=images).logits_per_image,
            atol=1e-4,
            rtol=1e-5,
        )


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_state_dict_fp16(tmp_path, tok, kind):
    """OpenAI ships fp16 weights in its own layout; clipforge loads them into fp32 master weights."""
    cfg = tiny_cfg(tok, kind, activation="quick_gelu")
    model = create_model(cfg, seed=2).eval()
    sd = {k: v.half() for k, v in convert.to_openai(model.state_dict()).items() if "num_batches" not in k}
    # OpenAI's files carry these three non-weights, which is how a bare state dict is known to be OpenAI's.
    extras = {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(32),
        "vocab_size": torch.tensor(1),
    }
    torch.save({**sd, **extras}, tmp_path / "openai.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no vocabulary in a bare state dict
        loaded, _, tok_none = load(tmp_path / "openai.pt", channels_last=False)
    assert tok_none is None
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert loaded.config.vision == cfg.vision and loaded.config.text == cfg.text
    reference = create_model(cfg).eval()
    reference.load_state_dict({k: v.float() for k, v in convert.from_openai(sd).items()}, strict=False)
    for a, b in zip(
        outputs(reference, tok, cfg.vision.image_size), outputs(loaded, tok, cfg.vision.image_size)
    ):
        assert torch.equal(a, b)


def test_bare_state_dict_warns_without_vocab_and_takes_one(tmp_path, tok):
    model = create_model(tiny_cfg(tok), seed=3)
    save_file(convert.to_openai(model.state_dict()), str(tmp_path / "w.safetensors"))
    tok.save(tmp_path / "vocab")
    with pytest.warns(UserWarning, match="vocab"):
        _, _, none = load(tmp_path / "w.safetensors", activation="gelu")
    assert none is None
    _, _, t = load(tmp_path / "w.safetensors", vocab=tmp_path / "vocab", activation="gelu")
    assert t(["a cat"]).tolist() == tok(["a cat"]).tolist()


def test_open_clip_state_dict_activation_warning_and_preset(tmp_path, tok):
    model = create_model(tiny_cfg(tok), seed=4)
    sd = {"state_dict": {"module." + k: v for k, v in convert.to_openai(model.state_dict()).items()}}
    torch.save(sd, tmp_path / "epoch_3.pt")  # an OpenCLIP training checkpoint: nested and DDP-prefixed
    with pytest.warns(UserWarning, match="activation"):
        loaded = read_checkpoint(tmp_path / "epoch_3.pt")
    assert loaded.config.activation == "gelu"
    with pytest.raises(CheckpointError, match="mis-shaped"):
        clipforge.checkpoint.build_model(read_checkpoint(tmp_path / "epoch_3.pt", preset="ViT-B-32"))


def test_open_clip_hub_directory(tmp_path, tok):
    cfg = tiny_cfg(tok, activation="quick_gelu")
    model = create_model(cfg, seed=5).eval()
    d = tmp_path / "oc"
    d.mkdir()
    save_file(convert.to_openai(model.state_dict()), str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {"embed_dim": 64, "quick_gelu": True},
                "preprocess_cfg": {
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.25, 0.25, 0.25],
                    "interpolation": "bilinear",
                },
            }
        )
    )
    tok.save(d)
    loaded, preprocess, t = load(d)
    assert loaded.config.activation == "quick_gelu"
    assert preprocess.config.std == (0.25, 0.25, 0.25) and preprocess.config.interpolation == "bilinear"
    for a, b in zip(outputs(model, tok, 32), outputs(loaded, t, 32)):
        assert torch.equal(a, b)


class _OpenAIJit(torch.nn.Module):
    """Holds a model's tensors under OpenAI's TorchScript names, text parts at the top level."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.visual
        t = model.text
        self.token_embedding, self.positional_embedding = t.token_embedding, t.positional_embedding
        self.transformer, self.ln_final, self.text_projection = t.transformer, t.ln_final, t.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("input_resolution", torch.tensor(32))
        self.register_buffer("context_length", torch.tensor(32))
        self.register_buffer("vocab_size", torch.tensor(t.token_embedding.num_embeddings))

    def forward(self, x):
        return self.visual(x)


def test_torchscript_archive(tmp_path, tok):
    model = create_model(tiny_cfg(tok, activation="quick_gelu"), seed=6).eval()
    traced = torch.jit.trace(_OpenAIJit(model), torch.randn(1, 3, 32, 32))
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _, _ = load(tmp_path / "ViT-tiny.pt")
    assert (
        loaded.config.activation == "quick_gelu"
    )  # TorchScript archives are OpenAI's: QuickGELU, no warning
    for a, b in zip(outputs(model, tok, 32), outputs(loaded, tok, 32)):
        assert torch.equal(a, b)


class _Node(torch.nn.Module):
    """A module that only holds tensors: scripting a tree of them gives an archive with OpenAI's names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def script_openai_archive(sd, path):
    """torch.jit.save(torch.jit.script(...)) of a module tree holding `sd` under its names, with OpenAI's three
    buffers, and an `attn_mask` plain attribute (a tensor that is not part of the state dict), as OpenAI's has."""
    root = _Node()
    for key, value in sd.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, _Node())
            module = getattr(module, name)
        if leaf in ("input_resolution", "context_length", "vocab_size"):
            module.register_buffer(leaf, value)
        else:
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    block = root.get_submodule("transformer.resblocks.0")
    block.attn_mask = torch.full((4, 4), float("-inf")).triu(1)
    torch.jit.save(torch.jit.script(root), str(path))


def test_scripted_openai_archive_reads_exactly_without_torch_jit_load(tmp_path, tok, monkeypatch):
    cfg = tiny_cfg(tok, activation="quick_gelu")
    model = create_model(cfg, seed=6).eval()
    sd = {k: v.half() for k, v in convert.to_openai(model.state_dict()).items()}
    extras = {
        "input_resolution": torch.tensor(32),
        "context_length": torch.tensor(32),
        "vocab_size": torch.tensor(9),
    }
    script_openai_archive({**sd, **extras}, tmp_path / "ViT-tiny.pt")
    trusted = torch.jit.load(str(tmp_path / "ViT-tiny.pt"))  # our own archive: the reference reader
    expected = trusted.state_dict()
    assert hasattr(getattr(trusted.transformer.resblocks, "0"), "attn_mask")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load runs code from the archive")

    monkeypatch.setattr(torch.jit, "load", refuse)
    got, source = read_state_dict(tmp_path / "ViT-tiny.pt")
    assert "TorchScript" in source
    assert list(got) == list(expected)  # the names state_dict() gives, attn_mask not among them
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no vocabulary in the archive
        loaded, _, _ = load(tmp_path / "ViT-tiny.pt")
    assert loaded.config.activation == "quick_gelu" and loaded.config.vision == cfg.vision
    reference = create_model(cfg).eval()
    reference.load_state_dict({k: v.float() for k, v in convert.from_openai(sd).items()})
    for a, b in zip(outputs(reference, tok, 32), outputs(loaded, tok, 32)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("via", ["file", "clipforge directory", "hugging face directory"])
def test_torchscript_setstate_never_runs(tmp_path, tok, via):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    if via == "file":
        path = tmp_path / "ViT-B-32.pt"
    elif via == "clipforge directory":
        save_model(create_model(tiny_cfg(tok), seed=11), tmp_path / "m")
        meta = json.loads((tmp_path / "m" / "clipforge.json").read_text())
        (tmp_path / "m" / "clipforge.json").write_text(json.dumps({**meta, "weights": "model.pt"}))
        path = tmp_path / "m" / "model.pt"
    else:
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps(convert.hf_config(tiny_cfg(tok))))
        path = tmp_path / "hf" / "pytorch_model.bin"
    write_file_writer_archive(path, victim)
    with pytest.raises(CheckpointError, match="__setstate__"):
        load(path if via == "file" else path.parent)
    assert victim.read_text() == "precious data\n"
    torch.jit.load(str(path))  # the payload is live: what clipforge.load would have done with torch.jit.load
    assert victim.read_text().startswith("AAAAAAAA")


def test_torchscript_archive_refuses_other_globals_and_bad_records(tmp_path):
    archive = tmp_path / "s.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with zipfile.ZipFile(archive) as z:
        records = {n: z.read(n) for n in z.namelist()}
    prefix = next(n for n in records if n.endswith("/data.pkl")).split("/")[0]

    def rewrite(name, **changes):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            for n, data in {**records, **{f"{prefix}/{k}": v for k, v in changes.items()}}.items():
                if data is not None:
                    z.writestr(n, data)
        return tmp_path / name

    evil_pickle = pickle.dumps(Evil(), protocol=2)
    with pytest.raises(CheckpointError, match=r"print, which a module.s tensors never need"):
        read_state_dict(rewrite("global.pt", **{"data.pkl": evil_pickle}))
    with pytest.raises(CheckpointError, match="lacks data/0"):
        read_state_dict(rewrite("missing.pt", **{"data/0": None}))
    with pytest.raises(CheckpointError, match="holds 3 bytes"):
        read_state_dict(rewrite("short.pt", **{"data/0": b"abc"}))


def test_inflating_tensor_views_are_refused(tmp_path, tok):
    """A zero-stride view stores one number for a whole tensor: a tiny file that would claim any amount of
    memory once copied."""
    sd = convert.to_openai(create_model(tiny_cfg(tok), seed=12).state_dict())
    sd["token_embedding.weight"] = torch.zeros(1, 1).expand(*sd["token_embedding.weight"].shape)
    torch.save(sd, tmp_path / "bomb.pt")
    with pytest.raises(CheckpointError, match="token_embedding.weight .* views more elements"):
        read_checkpoint(tmp_path / "bomb.pt", activation="gelu")


@pytest.mark.parametrize("fmt", ["clipforge directory", "openai state dict"])
def test_non_finite_weights_are_refused_naming_them(tmp_path, tok, fmt):
    model = create_model(tiny_cfg(tok), seed=13)
    with torch.no_grad():
        model.visual.proj[0, 0] = float("nan")
        model.text.ln_final.bias[3] = float("inf")
    if fmt == "clipforge directory":
        path = save_model(model, tmp_path / "m", tokenizer=tok)
    else:
        path = tmp_path / "w.pt"
        torch.save(convert.to_openai(model.state_dict()), path)
    with pytest.raises(CheckpointError, match="2 tensor.* NaN or infinite values: .*visual.proj") as e:
        load(path, activation="gelu")
    assert "ln_final.bias" in str(e.value)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_pickles_that_are_not_plain_state_dicts(tmp_path):
    torch.save({"visual.proj": torch.zeros(2, 2), "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_checkpoint(tmp_path / "evil.pt")


def test_bad_inputs_name_the_culprit(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    (tmp_path / "dir").mkdir()
    with pytest.raises(CheckpointError, match="not a model directory"):
        read_checkpoint(tmp_path / "dir")
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP state dict"):
        read_checkpoint(tmp_path / "other.pt")
    with zipfile.ZipFile(tmp_path / "z.pt", "w") as z:
        z.writestr("z/data.pkl", b"garbage")
    with pytest.raises(CheckpointError, match="z.pt"):
        read_checkpoint(tmp_path / "z.pt")


def test_partial_and_misshaped_weights_are_listed(tmp_path, tok):
    """A tampered clipforge directory: the config is known, so every problem is listed, nothing loads."""
    model = create_model(tiny_cfg(tok), seed=7)
    save_model(model, tmp_path / "m", tokenizer=tok)
    sd = convert.to_hf(model.state_dict())
    del sd["text_model.final_layer_norm.weight"]
    sd["visual_projection.weight"] = torch.zeros(5, 5)
    sd["vision_model.extra"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load(tmp_path / "m")
    msg = str(e.value)
    assert "1 missing: text.ln_final.weight" in msg
    assert "1 unexpected: vision_model.extra" in msg
    assert "visual.proj: checkpoint (5, 5) vs model (128, 64)" in msg


def test_strict_check_lists_every_problem(tok):
    model = create_model(tiny_cfg(tok), seed=8)
    sd = dict(model.state_dict())
    del sd["text.ln_final.weight"]
    sd["visual.extra"] = torch.zeros(3)
    sd["visual.proj"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as e:
        convert.check_state_dict(model, sd, "test.pt")
    msg = str(e.value)
    assert "1 missing: text.ln_final.weight" in msg
    assert "1 unexpected: visual.extra" in msg
    assert "visual.proj: checkpoint (5, 5) vs model (128, 64)" in msg


def test_tokenizer_vocabulary_mismatch_is_refused(tmp_path, tok):
    model = create_model(tiny_cfg(tok), seed=9)
    save_model(model, tmp_path / "m")
    other = clipforge.train_tokenizer(CAPTIONS[:10], vocab_size=520, context_length=32)
    other.save(tmp_path / "v")
    with pytest.raises(CheckpointError, match="wrong vocabulary"):
        load(tmp_path / "m", vocab=tmp_path / "v")


def test_default_model_missing_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make demo"):
        load("default")


def test_malformed_config_files_are_named(tmp_path, tok):
    save_model(create_model(tiny_cfg(tok), seed=10), tmp_path / "m", tokenizer=tok)
    (tmp_path / "m" / "clipforge.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="clipforge.json: unreadable JSON"):
        load(tmp_path / "m")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {}}))
    with pytest.raises(CheckpointError, match="config.json: vision_config is missing"):
        load(tmp_path / "hf")


def _set(path, value):
    def change(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value

    return change


MALFORMED_CLIPFORGE_JSON = [
    (_set(["config", "vision", "image_size"], "abc"), "config.vision.image_size must be an integer"),
    (_set(["config", "vision"], [1, 2]), "config.vision must be a JSON object, found list"),
    (_set(["config"], "ViT-B-32"), "config must be a JSON object, found str"),
    (_set(["config", "text", "layers"], 2.5), "config.text.layers must be an integer"),
    (_set(["config", "preprocess", "mean"], {"r": 0.5}), "config.preprocess.mean must be a list of 3 values"),
    (_set(["config", "preprocess", "std"], [0.5, "x", 0.5]), "config.preprocess.std must be a list of 3"),
    (_set(["config", "logit_bias_init"], "none"), "config.logit_bias_init must be a finite number or null"),
    (_set(["config", "activation"], "swish"), "activation must be one of"),
    (_set(["format_version"], "1"), "format_version must be an integer"),
    (_set(["weights"], ["model.safetensors"]), "weights must be a string"),
    (_set(["weights"], "../other/model.safetensors"), "weights must name a file in the directory"),
    (_set(["layout"], "timm"), "layout must be one of 'hf', 'openai'"),
]


@pytest.mark.parametrize("change, message", MALFORMED_CLIPFORGE_JSON)
def test_mistyped_clipforge_json_names_file_and_field(tmp_path, tok, change, message):
    save_model(create_model(tiny_cfg(tok), seed=10), tmp_path / "m", tokenizer=tok)
    meta = json.loads((tmp_path / "m" / "clipforge.json").read_text())
    change(meta)
    (tmp_path / "m" / "clipforge.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"clipforge.json: {re.escape(message)}"):
        load(tmp_path / "m")


MALFORMED_HF_CONFIG = [
    (_set(["text_config"], []), "text_config must be a JSON object, found list"),
    (_set(["vision_config", "hidden_size"], "abc"), "vision_config.hidden_size must be an integer"),
    (
        _set(["vision_config", "num_attention_heads"], 0),
        "vision_config.num_attention_heads must be a positive",
    ),
    (
        _set(["text_config", "eos_token_id"], None),
        "text_config.eos_token_id must be an integer, found NoneType",
    ),
    (_set(["text_config", "hidden_act"], ["gelu"]), "text_config.hidden_act must be a string"),
    (_set(["projection_dim"], 64.0), "projection_dim must be an integer, found float"),
    (_set(["logit_scale_init_value"], "2.6"), "logit_scale_init_value must be a finite number"),
]


@pytest.mark.parametrize("change, message", MALFORMED_HF_CONFIG)
def test_mistyped_hugging_face_config_names_file_and_field(tmp_path, tok, change, message):
    save_model(create_model(tiny_cfg(tok), seed=10), tmp_path / "m", tokenizer=tok)
    (tmp_path / "m" / "clipforge.json").unlink()  # now a plain Hugging Face directory
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    change(config)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json: {re.escape(message)}"):
        load(tmp_path / "m")


@pytest.mark.parametrize("name", ["clipforge.json", "config.json"])
def test_config_that_is_not_utf8_or_strict_json_is_named(tmp_path, tok, name):
    save_model(create_model(tiny_cfg(tok), seed=10), tmp_path / "m", tokenizer=tok)
    if name == "config.json":
        (tmp_path / "m" / "clipforge.json").unlink()
    text = (tmp_path / "m" / name).read_text()
    (tmp_path / "m" / name).write_bytes(text.encode("utf-16"))
    with pytest.raises(CheckpointError, match=f"{name}: unreadable JSON .*utf-8"):
        load(tmp_path / "m")
    (tmp_path / "m" / name).write_text(text.replace("{", '{"nan": NaN, ', 1))
    with pytest.raises(CheckpointError, match=f"{name}: unreadable JSON .*NaN is not a JSON number"):
        load(tmp_path / "m")


def test_hugging_face_refuses_a_resnet_clipforge_directory(tmp_path, tok):
    """transformers has no ResNet CLIP: rather than build a default ViT with random weights, it must refuse."""
    transformers = require("transformers")
    model = create_model(tiny_cfg(tok, "resnet"), seed=14)
    save_model(model, tmp_path / "rn", tokenizer=tok)
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.CLIPModel.from_pretrained(tmp_path / "rn")
    # OpenAI's and OpenCLIP's code read the weights file: a state dict in OpenAI's names.
    openai = load_file(str(tmp_path / "rn" / "openai_model.safetensors"))
    expected = export_state_dict(model, "openai")
    assert "token_embedding.weight" in openai and "visual.attnpool.c_proj.weight" in openai
    assert openai.keys() == expected.keys() and all(torch.equal(openai[k], v) for k, v in expected.items())


# --- one tower at a time ---------------------------------------------------------------------------------------


def _save_layouts(tmp_path, tok, kind):
    """The model and where it was saved in each layout that holds it."""
    model = create_model(tiny_cfg(tok, kind), seed=3).eval()
    paths = {"clipforge directory": save_model(model, tmp_path / "m", tokenizer=tok)}
    paths["openai .pt"] = save_openai(model, tmp_path / "openai.pt")
    paths["openai .safetensors"] = save_openai(model, tmp_path / "openai.safetensors")
    return model, paths


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_one_tower_loads_only_its_tensors_and_encodes_exactly(tmp_path, tok, kind):
    model, paths = _save_layouts(tmp_path, tok, kind)
    size = model.config.vision.image_size
    full_image, full_text = outputs(model, tok, size)
    for where, path in paths.items():
        text_only, _, _ = load(
            path, vocab=None if "directory" in where else tmp_path / "m", towers="text", activation="gelu"
        )
        image_only, _, _ = load(
            path, vocab=tmp_path / "m", towers="image", activation="gelu", channels_last=False
        )
        assert not any(k.startswith("visual.") for k in text_only.state_dict()), where
        assert not any(k.startswith("text.") for k in image_only.state_dict()), where
        assert text_only.logit_scale == model.logit_scale  # the shared tensors come with either tower
        with torch.no_grad():
            assert torch.equal(text_only.encode_text(tok(["a red cat on a table", "boat"])), full_text), where
            images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            assert torch.equal(image_only.encode_image(images), full_image), where
        with pytest.raises(clipforge.TowerNotLoadedError, match="without its image tower"):
            text_only.encode_image(images)
        with pytest.raises(clipforge.TowerNotLoadedError, match="without its text tower"):
            image_only.encode_text(tok(["boat"]))


def test_one_tower_reads_only_its_tensors_from_safetensors(tmp_path, tok, monkeypatch):
    from safetensors import safe_open

    save_model(create_model(tiny_cfg(tok), seed=0), tmp_path / "m", tokenizer=tok)
    read = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.file = safe_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr("clipforge.checkpoint.common.safe_open", Recording)
    load(tmp_path / "m", towers="text")
    assert read and not [k for k in read if k.startswith(("vision_model.", "visual_projection"))]


def test_unknown_towers_value_is_named(tmp_path, tok):
    save_model(create_model(tiny_cfg(tok), seed=0), tmp_path / "m", tokenizer=tok)
    with pytest.raises(ValueError, match="towers='vision'.*both, text, image"):
        load(tmp_path / "m", towers="vision")


# --- larger images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_image_size_at_the_trained_size_changes_nothing(tmp_path, tok, kind):
    cfg = tiny_cfg(tok, kind)
    save_model(create_model(cfg, seed=4), tmp_path / "m", tokenizer=tok)
    plain, pre, _ = load(tmp_path / "m", channels_last=False)
    same, pre_same, _ = load(tmp_path / "m", image_size=cfg.vision.image_size, channels_last=False)
    assert pre_same.config == pre.config
    for a, b in zip(outputs(plain, tok, cfg.vision.image_size), outputs(same, tok, cfg.vision.image_size)):
        assert torch.equal(a, b)


def test_vit_at_another_size_matches_transformers_interpolate_pos_encoding(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    save_model(create_model(tiny_cfg(tok), seed=5), tmp_path / "m", tokenizer=tok)  # trained at 32 px
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "m").eval()
    for size in (48, 24, 64):
        model, preprocess, _ = load(tmp_path / "m", image_size=size)
        assert preprocess.config.image_size == size and model.config.vision.image_size == size
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            ref = hf.get_image_features(pixel_values=images, interpolate_pos_encoding=True).pooler_output
            torch.testing.assert_close(model.encode_image(images), ref, atol=1e-5, rtol=1e-5)


def test_convert_stores_the_new_size_and_transformers_reads_it(tmp_path, tok):
    from clipforge.cli import main

    save_model(create_model(tiny_cfg(tok), seed=6), tmp_path / "m", tokenizer=tok)
    assert main(["convert", str(tmp_path / "m"), "--out", str(tmp_path / "big"), "--image-size", "48"]) == 0
    stored, preprocess, _ = load(tmp_path / "big")
    resized, _, _ = load(tmp_path / "m", image_size=48)
    assert preprocess.config.image_size == 48
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(stored.encode_image(images), resized.encode_image(images))
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "big").eval()  # 48 px without interpolation
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(stored.encode_image(images), ref, atol=1e-5, rtol=1e-5)


def test_resnet_runs_at_another_size_and_a_bad_size_is_named(tmp_path, tok):
    from clipforge.model.resize import ResizeError

    save_model(create_model(tiny_cfg(tok, "resnet"), seed=7), tmp_path / "m", tokenizer=tok)  # 64 px
    model, preprocess, _ = load(tmp_path / "m", image_size=96)
    assert model.visual.attnpool.positional_embedding.shape[0] == 3 * 3 + 1
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(1, 3, 96, 96))).all()
    with pytest.raises(ResizeError, match="image_size=80.*multiple of 32"):
        load(tmp_path / "m", image_size=80)
