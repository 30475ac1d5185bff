"""Two CPU processes (gloo on 127.0.0.1) with global batch B against one process with batch B: the DDP gradient
of every loss variant (gathered, row-local, sigmoid; with and without accumulation) and a whole train() run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train import CAPTIONS, MICRO, SAMPLES, memory_factory, tiny_cfg

from clipforge.model import CLIPConfig, create_model
from clipforge.train import train
from clipforge.train.state import load_state, step_dirs
from clipforge.train.step import forward_backward

VARIANTS = [
    ("clip", False, 1),
    ("clip", True, 1),
    ("sigmoid", False, 1),
    ("clip", False, 2),
    ("sigmoid", False, 2),
]
B = 8  # global batch


def _batch():
    cfg = CLIPConfig.from_dict(MICRO)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, 32, 32, generator=g)
    tokens = torch.zeros(B, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5] = cfg.text.sot_token_id, torch.randint(1, 100, (B, 4), generator=g)
    tokens[torch.arange(B), 5 + torch.arange(B) % 3] = cfg.text.eot_token_id
    return images, tokens


def _model(loss: str):
    cfg = CLIPConfig.from_dict(MICRO).replace(logit_bias_init=-5.0 if loss == "sigmoid" else None)
    return create_model(cfg, seed=0)


def _grads(model, images, tokens, loss, local, accum) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = forward_backward(model, images, tokens, loss=loss, local_loss=local, accum_steps=accum)
    return float(value), {n: p.grad.clone() for n, p in model.module.named_parameters()} if hasattr(
        model, "module"
    ) else {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    images, tokens = _batch()
    mine = slice(rank * B // 2, (rank + 1) * B // 2)
    results = []
    for loss, local, accum in VARIANTS:
        ddp = torch.nn.parallel.DistributedDataParallel(_model(loss))
        value, grads = _grads(ddp, images[mine], tokens[mine], loss, local, accum)
        v = torch.tensor([value])
        dist.all_reduce(v)  # rank losses averaged: the global loss for every variant
        results.append((float(v) / 2, grads))
    if rank == 0:
        torch.save(results, Path(out) / "grads.pt")
    # A whole run: train() joins the existing process group and tears it down at the end.
    train(
        tiny_cfg(Path(out) / "run2", vocab=str(Path(out) / "tokenizer"), batch_size=8, steps=3),
        loader_factory=memory_factory(SAMPLES),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    # One process first: its run trains the vocabulary both runs share.
    run1 = train(
        tiny_cfg(tmp_path / "run1", batch_size=16, steps=3),
        loader_factory=memory_factory(SAMPLES),
        captions=CAPTIONS,
    )
    (tmp_path / "tokenizer").symlink_to(run1 / "tokenizer")
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")

    images, tokens = _batch()
    results = torch.load(tmp_path / "grads.pt")
    for (loss, local, accum), (value2, grads2) in zip(VARIANTS, results):
        value1, grads1 = _grads(_model(loss), images, tokens, loss, local, 1)
        assert abs(value1 - value2) < 1e-5, (loss, local, accum)
        for n in grads1:
            assert torch.allclose(grads1[n], grads2[n], atol=1e-6, rtol=1e-4), (loss, local, accum, n)

    _, one = load_state(step_dirs(run1)[-1])
    _, two = load_state(step_dirs(tmp_path / "run2")[-1])
    for k, v in one["model"].items():
        assert torch.allclose(v, two["model"][k], atol=1e-5), k
    assert two["world_size"] == 2
