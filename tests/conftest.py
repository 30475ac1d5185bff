"""Shared fixtures: a tiny CLIP trained on synthetic coloured shapes inside the test session.

The model learns to tell the 24 (colour, shape) classes apart in well under a minute on two CPU cores, so the
zero-shot, tagging, moderation, scoring and explanation tests can assert accuracy against known answers.
"""

from __future__ import annotations

import importlib
import os
import random
from types import ModuleType

import pytest
import torch

import clipforge
from clipforge.data.synthetic import shape_samples
from clipforge.encoder import Encoder
from clipforge.loss import clip_loss
from clipforge.transforms import Preprocess

IMAGE_SIZE = 32


def require(module: str) -> ModuleType:
    """`module`, imported; without it the test (or, at module level, the file) is skipped, except where $CI is
    set: CI installs every extra, so a missing module there is a broken install and fails instead of hiding the
    tests behind a skip. An ImportError from inside an installed module is a bug and always fails."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or module.split(".")[0] != e.name.split(".")[0]:
            raise  # the module is there but imports something missing: not ours to hide
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required in CI but is not installed", pytrace=False)
        pytest.skip(f"{module} is not installed", allow_module_level=True)


@pytest.fixture(autouse=True)
def _seeded_rngs():
    """Every test starts from the same global RNG state, so an unseeded torch.randn in one test draws the same
    numbers whichever tests ran before it (CI once failed a tolerance only in the full run's order)."""
    torch.manual_seed(0)
    random.seed(0)


def save_tiny_model(path, seed: int = 0):
    """A random one-layer `tiny` model (32 px) with a vocabulary trained on shape captions, saved at `path`.

    For tests that need a real checkpoint directory but no trained weights (CLI, embedding, index)."""
    tok = clipforge.train_tokenizer(
        [c for s in shape_samples(48) for c in s.captions], 560, context_length=32
    )
    cfg = clipforge.get_config("tiny").replace(
        vision={"image_size": 32, "layers": 1},
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
            "layers": 1,
        },
    )
    return clipforge.save_model(clipforge.create_model(cfg, seed=seed), path, tokenizer=tok)


class _FileWriter(torch.nn.Module):
    """A scripted module whose __setstate__, which torch.jit.load runs, overwrites the file named in its state
    through a shared memory map: what a crafted OpenAI-looking `.pt` can do to a user's files."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        mapped = torch.from_file(state[0], shared=True, size=8, dtype=torch.uint8)
        mapped.fill_(65)
        self.w = state[1] + mapped.sum().float() * 0  # uses the map, so that TorchScript keeps the write


def write_file_writer_archive(path, target) -> None:
    """A TorchScript archive at `path` that overwrites `target` with b"AAAAAAAA" when torch.jit.load reads it."""
    torch.jit.save(torch.jit.script(_FileWriter(str(target))), str(path))


def train_shapes_model(steps: int = 800, seed: int = 0) -> Encoder:
    """A ViT (patch 8 on 32 px: a 4x4 grid) and a text tower trained with InfoNCE on shape captions."""
    torch.manual_seed(seed)
    samples = shape_samples(24 * 40, size=IMAGE_SIZE, seed=seed)
    captions = [c for s in samples[:96] for c in s.captions]
    tok = clipforge.train_tokenizer(captions, 600, context_length=16)
    cfg = clipforge.get_config("tiny").replace(
        embed_dim=64,
        vision={"image_size": IMAGE_SIZE, "width": 64, "layers": 2, "heads": 2},
        text={
            "context_length": 16,
            "width": 64,
            "layers": 2,
            "heads": 2,
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        },
    )
    model = clipforge.create_model(cfg, seed=seed)
    pre = Preprocess(cfg.preprocess)
    pixels = pre.batch([s.image for s in samples])  # (N, 3, 32, 32)
    tokens = [tok(s.captions) for s in samples]  # N x (3, 16)
    by_label: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    labels = sorted(by_label)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on shared, oversubscribed CI cores one thread was ~2x faster than two
    try:
        _steps(model, opt, sched, pixels, tokens, by_label, labels, rng, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return Encoder(model, pre, tok, name="shapes-test")


def _steps(model, opt, sched, pixels, tokens, by_label, labels, rng, steps: int) -> None:
    for _ in range(steps):
        # One image per class: no false negatives inside a batch.
        idx = [rng.choice(by_label[lab]) for lab in labels]
        txt = torch.stack([tokens[i][rng.randrange(3)] for i in idx])
        out = model(pixels[idx], txt)
        loss = clip_loss(out.image_features, out.text_features, out.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.fixture(scope="session")
def shapes_encoder() -> Encoder:
    return train_shapes_model()


@pytest.fixture(scope="session")
def shapes_model_dir(shapes_encoder, tmp_path_factory):
    """The trained model saved as a clipforge directory, for command-line tests."""
    d = tmp_path_factory.mktemp("shapes-model") / "model"
    clipforge.save_model(shapes_encoder.model, d, tokenizer=shapes_encoder.tokenizer)
    return d


@pytest.fixture(scope="session")
def shapes_test_set(tmp_path_factory):
    """Held-out synthetic images (another seed than training) as PNG files and a manifest."""
    from clipforge.data.synthetic import write_shapes

    return write_shapes(tmp_path_factory.mktemp("shapes-test"), 24 * 6, size=IMAGE_SIZE, seed=123)
