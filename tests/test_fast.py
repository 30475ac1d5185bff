"""Fast paths: int8 linears, bf16 autocast, channels-last and compile give the fp32 embeddings (within stated
tolerances), keep the API, and are reachable through clipforge.load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.checkpoint import load, save_model
from clipforge.fast import AutocastCLIP, Int8Linear, optimize, to_device
from clipforge.model.layers import Attention


def _inputs(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, 200, (n, model.config.text.context_length), generator=g)
    tokens[:, 10:] = 0
    tokens[:, 9] = model.config.text.eot_token_id
    return images, tokens


def test_int8_linear_matches_float_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 5, 64)
    q = Int8Linear.from_linear(lin)
    ref = lin(x)
    out = q(x)
    assert out.shape == ref.shape
    # two 8-bit roundings: error well under 1% of the output scale
    assert (out - ref).abs().max() < 0.01 * ref.abs().max()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9999


@pytest.mark.parametrize("name", ["tiny", "tiny-rn"])
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_precisions_stay_close_to_fp32(name, precision):
    ref = clipforge.create_model(name, seed=0).eval()
    images, tokens = _inputs(ref)
    with torch.no_grad():
        ri, rt = ref.encode_image(images), ref.encode_text(tokens)
        fast = optimize(clipforge.create_model(name, seed=0), precision=precision)
        fi, ft = fast.encode_image(images), fast.encode_text(tokens)
    assert fi.dtype == ft.dtype == torch.float32
    assert F.cosine_similarity(fi, ri).min() > 0.99
    assert F.cosine_similarity(ft, rt).min() > 0.99
    if precision == "int8":
        assert not any(isinstance(m, Attention | torch.nn.Linear) for m in fast.modules())


def test_bf16_is_an_explicit_model_not_a_patched_forward():
    model, ref = clipforge.create_model("tiny", seed=0), clipforge.create_model("tiny", seed=0).eval()
    images, tokens = _inputs(model)
    fast = optimize(model, precision="bf16")
    # Nothing is assigned over a module's forward: the towers are the classes they were, and the model
    # passed in still runs fp32 (bf16 lives in AutocastCLIP.encode_*, which shares the towers' weights).
    assert isinstance(fast, AutocastCLIP) and fast.visual is model.visual
    assert all("forward" not in vars(m) for m in fast.modules())
    assert fast.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), ref.encode_text(tokens))
        assert fast.encode_image(images, normalize=True).dtype == torch.float32


def test_channels_last_resnet_is_exact_enough():
    ref = clipforge.create_model("tiny-rn", seed=0).eval()
    images, _ = _inputs(ref)
    fast = optimize(clipforge.create_model("tiny-rn", seed=0), channels_last=True)
    assert fast.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=1e-4)
    # parameter names are those of the checkpoint
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_unknown_precision_is_a_value_error():
    with pytest.raises(ValueError, match="fp16"):
        optimize(clipforge.create_model("tiny", seed=0), precision="fp16")


def test_load_applies_fast_options(tmp_path):
    model = clipforge.create_model("tiny", seed=0)
    save_model(model, tmp_path / "m")
    with pytest.warns(UserWarning, match="vocabulary"):
        fast, _, _ = load(tmp_path / "m", precision="int8")
    assert any(isinstance(m, Int8Linear) for m in fast.modules())
    images, tokens = _inputs(model)
    with torch.no_grad():
        cos = F.cosine_similarity(fast.encode_text(tokens), model.eval().encode_text(tokens))
    assert cos.min() > 0.99


@pytest.mark.slow
def test_compile_matches_eager():
    ref = clipforge.create_model("tiny", seed=0).eval()
    images, tokens = _inputs(ref, n=2)
    fast = optimize(clipforge.create_model("tiny", seed=0), compile=True)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode_image(images), ref.encode_image(images), atol=1e-4, rtol=1e-4)
    assert fast.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_graph_and_pinned_transfer():
    from clipforge.fast import CUDAGraphRunner

    ref = clipforge.create_model("tiny", seed=0).eval().cuda()
    images, tokens = _inputs(ref, n=8)
    x = to_device(images, "cuda")
    with torch.no_grad():
        r = ref.encode_image(x)
        runner = CUDAGraphRunner(ref.encode_image, x)
        torch.testing.assert_close(runner(x[:5]), r[:5], atol=1e-4, rtol=1e-4)
        fast = optimize(clipforge.create_model("tiny", seed=0).cuda(), precision="bf16")
        assert F.cosine_similarity(fast.encode_image(x), r).min() > 0.99
