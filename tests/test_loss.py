"""Losses against naive O(N^2) Python loops, and the row-local / rank-offset variants against the global loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clipforge.loss as L


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img.requires_grad_(), txt.requires_grad_()


def naive_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        # image i against every text, and text i against every image
        row = [scale * torch.dot(img[i], txt[j]) for j in range(n)]
        col = [scale * torch.dot(txt[i], img[j]) for j in range(n)]
        total = total - (row[i] - torch.logsumexp(torch.stack(row), 0))
        total = total - (col[i] - torch.logsumexp(torch.stack(col), 0))
    return total / (2 * n)


def naive_sigmoid(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * torch.dot(img[i], txt[j]) + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / n


def test_clip_loss_matches_naive_value_and_gradient():
    img, txt = features(7)
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = L.clip_loss(img, txt, scale)
    ref = naive_clip(img, txt, 14.3)
    assert torch.allclose(ours, ref, atol=1e-12)
    g_ours = torch.autograd.grad(ours, (img, txt))
    g_ref = torch.autograd.grad(ref, (img, txt))
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_sigmoid_loss_matches_naive_value_and_gradient():
    img, txt = features(6, seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    ours = L.sigmoid_loss(img, txt, scale, bias)
    ref = naive_sigmoid(img, txt, 10.0, -3.0)
    assert torch.allclose(ours, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (img, txt)), torch.autograd.grad(ref, (img, txt))):
        assert torch.allclose(a, b, atol=1e-12)


def test_perfect_alignment_gives_low_loss_and_chance_gives_log_n():
    img, _ = features(5)
    aligned = L.clip_loss(img.detach(), img.detach(), torch.tensor(100.0, dtype=torch.float64))
    assert aligned < 1e-3
    same = torch.ones(5, 4, dtype=torch.float64) / 2  # every pair equally similar: loss = log N
    assert torch.allclose(
        L.clip_loss(same, same, torch.tensor(1.0)), torch.tensor(math.log(5), dtype=torch.float64)
    )


@pytest.mark.parametrize("kind", ["clip-local", "clip-gathered", "sigmoid"])
def test_per_rank_losses_average_to_the_global_loss(monkeypatch, kind):
    """Emulate W ranks in one process: rank r holds rows [rB, (r+1)B) and its gather returns the global batch
    (differentiable, as the real all_gather is). The mean over ranks of the rank losses, and its gradient
    (what DDP's average of the ranks' gradients computes), equal the single-process loss on the global batch."""
    W, B = 3, 4
    img, txt = features(W * B, seed=2)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    if kind == "sigmoid":
        ref = L.sigmoid_loss(img, txt, scale, bias)
    else:
        ref = L.clip_loss(img, txt, scale)
    losses = []
    for r in range(W):
        mine_i, mine_t = img[r * B : (r + 1) * B], txt[r * B : (r + 1) * B]
        monkeypatch.setattr(L, "world", lambda r=r: (r, W))
        monkeypatch.setattr(L, "gather_with_grad", lambda x, mi=mine_i: img if x is mi else txt)
        if kind == "sigmoid":
            losses.append(L.sigmoid_loss(mine_i, mine_t, scale, bias))
        else:
            losses.append(L.clip_loss(mine_i, mine_t, scale, local=(kind == "clip-local")))
    if kind != "sigmoid":
        assert all(torch.allclose(x, ref, atol=1e-12) for x in losses) == (kind == "clip-gathered")
    mean = torch.stack(losses).mean()
    assert torch.allclose(mean, ref, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(mean, (img, txt)), torch.autograd.grad(ref, (img, txt))):
        assert torch.allclose(ours, theirs, atol=1e-12)


def test_contrastive_loss_dispatch_and_errors():
    img, txt = features(4)
    s = torch.tensor(5.0)
    assert torch.allclose(L.contrastive_loss("clip", img, txt, s), L.clip_loss(img.float(), txt.float(), s))
    b = torch.tensor(-2.0)
    assert torch.allclose(
        L.contrastive_loss("sigmoid", img, txt, s, b), L.sigmoid_loss(img.float(), txt.float(), s, b)
    )
    # bf16 features (autocast) are lifted to fp32 before the (N, N) logits, where bf16 loses accuracy
    low = L.contrastive_loss("clip", img.bfloat16(), txt.bfloat16(), s.bfloat16())
    assert low.dtype == torch.float32
    exact = L.clip_loss(img.bfloat16().float(), txt.bfloat16().float(), s.bfloat16().float())
    assert torch.allclose(low, exact, atol=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        L.contrastive_loss("sigmoid", img, txt, s, None)
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        L.contrastive_loss("triplet", img, txt, s)
