"""Model numerics: every preset forward/backward, parity with Hugging Face's CLIPModel on shared random
weights, exactness of text trimming, and the OpenAI layout round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import require

from clipforge.model import CLIPConfig, convert, create_model, get_config, list_models

# Parameter counts of the published checkpoints (OpenAI's models; ViT-H-14 is OpenCLIP's).
PUBLISHED_PARAMS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
    "ViT-H-14": 986_109_441,
}


def small_config(kind: str = "vit", activation: str = "quick_gelu") -> CLIPConfig:
    """Heads are 64 wide, as in every published CLIP, so the shape-based config inference applies."""
    vision = (
        {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "heads": 2}
        if kind == "vit"
        else {"kind": "resnet", "image_size": 64, "width": 16, "layers": (1, 2, 1, 1), "heads": 8}
    )
    cfg = get_config("tiny").replace(
        embed_dim=48,
        activation=activation,
        vision=vision,
        text={
            "vocab_size": 300,
            "width": 128,
            "heads": 2,
            "layers": 2,
            "context_length": 16,
            "sot_token_id": 298,
            "eot_token_id": 299,
        },
    )
    return cfg


def random_tokens(n: int, cfg: CLIPConfig, seed: int = 0) -> torch.Tensor:
    """Rows of [sot, words..., eot, 0, ...] with different lengths, as a tokenizer makes them."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.text
    tokens = torch.zeros(n, t.context_length, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(0, t.context_length - 1, (1,), generator=g))
        tokens[i, 0] = t.sot_token_id
        tokens[i, 1 : 1 + length] = torch.randint(1, t.sot_token_id, (length,), generator=g)
        tokens[i, 1 + length] = t.eot_token_id
    return tokens


def test_preset_parameter_counts_match_published_models():
    for name, expected in PUBLISHED_PARAMS.items():
        with torch.device("meta"):
            model = create_model(name)
        assert sum(p.numel() for p in model.parameters()) == expected, name


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="ViT-B-32"):
        get_config("ViT-B-33")


@pytest.mark.parametrize("name", list_models())
def test_every_preset_forward_backward(name):
    cfg = get_config(name)
    if name in PUBLISHED_PARAMS:  # the full-size presets run at depth 1 to keep CPU tests fast
        vision_layers = 1 if cfg.vision.kind == "vit" else (1, 1, 1, 1)
        cfg = cfg.replace(vision={"layers": vision_layers}, text={"layers": 1})
    model = create_model(cfg, seed=0)
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(2, cfg)
    img, txt, scale, _ = model(images, tokens)
    assert img.shape == txt.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    logits = scale * img @ txt.t()
    labels = torch.arange(2)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    if (
        cfg.vision.kind == "vit"
    ):  # ResNet blocks start as identities (zero BN gain), so some grads are 0 there
        assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_logit_scale_init_and_clamp():
    model = create_model(small_config(), seed=0)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == 100.0


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_parity_with_hugging_face(activation):
    transformers = require("transformers")
    cfg = small_config("vit", activation)
    hf_cfg = transformers.CLIPConfig(**convert.hf_config(cfg))
    torch.manual_seed(0)
    hf = transformers.CLIPModel(hf_cfg).eval()
    # Hugging Face initialises biases and LayerNorms to constants; randomise everything so that a swapped
    # or transposed tensor cannot hide.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        hf.logit_scale.fill_(2.0)
    ours = create_model(cfg)
    sd = convert.from_hf(hf.state_dict())
    convert.check_state_dict(ours, sd, "hf")
    ours.load_state_dict(sd)
    ours.eval()

    images = torch.randn(3, 3, 32, 32)
    tokens = random_tokens(4, cfg, seed=1)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=images)
        img = ours.encode_image(images)
        txt = ours.encode_text(tokens)
        per_image, _ = ours.logits(images, tokens)
    torch.testing.assert_close(img, _unnormalised(hf, images=images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, _unnormalised(hf, tokens=tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_image, ref.logits_per_image, atol=1e-4, rtol=1e-5)

    # And back: clipforge weights exported to Hugging Face names give the same model.
    back = transformers.CLIPModel(hf_cfg).eval()
    back.load_state_dict(convert.to_hf(ours.state_dict()), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=tokens, pixel_values=images).logits_per_image,
            ref.logits_per_image,
            atol=1e-5,
            rtol=1e-5,
        )


def _unnormalised(hf, images=None, tokens=None) -> torch.Tensor:
    """Projected, not normalised, features from a Hugging Face CLIPModel (the API changed across versions)."""
    with torch.no_grad():
        if images is not None:
            pooled = hf.vision_model(pixel_values=images).pooler_output
            return hf.visual_projection(pooled)
        pooled = hf.text_model(input_ids=tokens).pooler_output
        return hf.text_projection(pooled)


def test_text_trimming_is_exact():
    model = create_model(small_config(), seed=0).eval()
    tokens = random_tokens(5, model.config, seed=3)
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.text.trim = False
        full = model.encode_text(tokens)
    # The same arithmetic on fewer positions; only fp32 summation order (kernel blocking) differs.
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_pooling_ignores_tokens_after_end_of_text():
    model = create_model(small_config(), seed=0).eval()
    tokens = random_tokens(3, model.config, seed=4)
    noisy = tokens.clone()
    for i, row in enumerate(tokens):
        eot = int((row == model.config.text.eot_token_id).nonzero()[0])
        noisy[i, eot + 1 :] = torch.randint(1, 200, (tokens.shape[1] - eot - 1,))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), model.encode_text(noisy))


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_layout_round_trip(kind):
    cfg = small_config(kind)
    model = create_model(cfg, seed=0).eval()
    openai_sd = convert.to_openai(model.state_dict())
    assert "token_embedding.weight" in openai_sd and "text_projection" in openai_sd
    native = convert.from_openai(openai_sd)
    inferred = convert.infer_config(native, activation=cfg.activation)
    assert inferred.vision == cfg.vision and inferred.text == cfg.text and inferred.embed_dim == cfg.embed_dim
    clone = create_model(inferred)
    clone.load_state_dict(native)
    clone.eval()
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(2, cfg)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), clone.encode_image(images))
        assert torch.equal(model.encode_text(tokens), clone.encode_text(tokens))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    grads = []
    for enabled in (False, True):
        model = create_model(cfg, seed=0)
        model.set_grad_checkpointing(enabled)
        img, txt, scale, _ = model(
            torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), random_tokens(2, cfg)
        )
        (scale * img @ txt.t()).logsumexp(0).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="patch_size"):
        small_config().replace(vision={"image_size": 30})
    with pytest.raises(ValueError, match="unknown key"):
        CLIPConfig.from_dict({**small_config().to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="activation"):
        small_config().replace(activation="relu")


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_tower_forward_is_head_of_trunk_at_every_split(kind):
    """forward == head(trunk(x, n), n) for every number of unlocked top blocks n, image and text towers."""
    cfg = small_config(kind)
    model = create_model(cfg, seed=0).eval()
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = random_tokens(3, cfg, seed=5)
    with torch.no_grad():
        for tower, x in ((model.visual, images), (model.text, tokens)):
            assert tower.num_blocks == (1 if tower is model.visual and kind == "resnet" else 2)
            full = tower(x)
            for n in range(tower.num_blocks + 1):
                feats = tower.trunk(x, n)
                rows = feats if isinstance(feats, tuple) else (feats,)
                assert all(t.shape[0] == 3 for t in rows)  # per sample along dim 0
                assert torch.equal(tower.head(feats, n), full), (n, type(tower).__name__)
            with pytest.raises(ValueError, match="unlockable blocks"):
                tower.trunk(x, tower.num_blocks + 1)
    # Unlocked = 0 hands over pooled features (B, width); above 0, states at a block's input.
    assert model.visual.trunk(images).shape == (3, cfg.vision.width * (32 if kind == "resnet" else 1))


def test_text_head_accepts_untrimmed_trunk_states():
    """A feature cache stores text states at full length (`trim` off); the head gives the same features."""
    model = create_model(small_config(), seed=0).eval()
    tokens = random_tokens(4, model.config, seed=6)
    with torch.no_grad():
        model.text.trim = False
        hidden, pos = model.text.trunk(tokens, 1)
        model.text.trim = True
        assert hidden.shape[1] == model.config.text.context_length
        torch.testing.assert_close(
            model.text.head((hidden, pos), 1), model.text(tokens), atol=1e-5, rtol=1e-5
        )
