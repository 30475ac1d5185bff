"""Training loop: schedule and parameter groups, accumulation == large batch, a run that learns and writes its
directory, resume == straight run (clean stop and SIGKILL, metrics included), resume past a damaged checkpoint,
bad samples in the run log, tower locking, and fine-tuning from an fp16 file.

Data comes from an in-memory loader over the synthetic shapes with build_loader's signature, so these tests do
not depend on the data package."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.data.synthetic import shape_samples
from clipforge.model import CLIPConfig, create_model, get_config
from clipforge.train import TrainConfig, load_config, optim, train
from clipforge.train.state import Position, ResumeError, load_state, save_state, step_dirs
from clipforge.train.step import forward_backward
from clipforge.transforms import Preprocess

TESTS = Path(__file__).parent
_PIXELS: dict[tuple, torch.Tensor] = {}


class MemoryLoader:
    """Global batch i of an epoch = a seeded permutation's slice [iG, (i+1)G), G = batch_size x world_size; this
    rank takes its B rows. Deterministic in (seed, epoch), starts at `start_batch`, as build_loader does."""

    def __init__(
        self,
        samples,
        preprocess_cfg,
        tokenizer,
        batch_size,
        rank,
        world_size,
        seed,
        epoch,
        start_batch,
        block_from=None,
    ):
        key = (id(samples), preprocess_cfg.image_size)
        if key not in _PIXELS:
            _PIXELS[key] = Preprocess(preprocess_cfg).batch([s.image for s in samples])
        self.pixels, self.samples, self.tok = _PIXELS[key], samples, tokenizer
        self.B, self.rank, self.world, self.start = batch_size, rank, world_size, start_batch
        self.order = torch.randperm(
            len(samples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)
        )
        self.epoch, self.block_from = epoch, block_from
        self.stats = {"bad": 0, "seen": 0}

    def __len__(self) -> int:  # batches this iteration yields, as build_loader's Loader counts them
        return len(self.samples) // (self.B * self.world) - self.start

    def __iter__(self):
        G = self.B * self.world
        for i in range(self.start, self.start + len(self)):
            if self.block_from is not None and i >= self.block_from:
                time.sleep(3600)  # the SIGKILL test kills the process here
            idx = self.order[i * G : (i + 1) * G][self.rank * self.B : (self.rank + 1) * self.B]
            caps = [self.samples[j].captions[(j + self.epoch) % 3] for j in idx.tolist()]
            yield self.pixels[idx], self.tok(caps)


def memory_factory(samples, block_from=None):
    def build_loader(
        source,
        *,
        preprocess_cfg,
        tokenizer,
        batch_size,
        train=True,
        rank=0,
        world_size=1,
        workers=2,
        seed=0,
        epoch=0,
        max_bad_fraction=0.01,
        samples_per_epoch=None,
        start_batch=0,
    ):
        return MemoryLoader(
            samples,
            preprocess_cfg,
            tokenizer,
            batch_size,
            rank,
            world_size,
            seed,
            epoch,
            start_batch,
            block_from,
        )

    return build_loader


# A model small enough for tests on two busy cores; heads are 64 wide, so a bare state dict's config is inferable.
MICRO = {
    "embed_dim": 32,
    "activation": "gelu",
    "vision": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 1},
    "text": {
        "context_length": 16,
        "vocab_size": 600,
        "width": 64,
        "heads": 1,
        "layers": 2,
        "sot_token_id": 598,
        "eot_token_id": 599,
    },
}


def micro_model(directory: Path) -> Path:
    """MICRO as a model JSON file in `directory` (a test's own temporary folder, never a shared one); written
    atomically, as spawned ranks of the distributed test may ask for it at the same time."""
    path = directory / "micro-model.json"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(MICRO))
        os.replace(tmp, path)
    return path


SAMPLES = shape_samples(96, size=32, seed=0)
CAPTIONS = [c for s in SAMPLES for c in s.captions]


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    """The micro model's run config; its model file sits beside the run directory `out`."""
    base = dict(
        data=("memory",),
        out=str(out),
        model=str(micro_model(out.parent)) if "model" not in kw else kw["model"],
        vocab_size=600,
        batch_size=16,
        steps=6,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=3,
        progress=False,
        workers=0,
        device="cpu",
        log_every=1,
    )
    return load_config(None, **{**base, **kw})


def params(model_or_sd) -> dict[str, torch.Tensor]:
    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def metric_records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(run: Path, reference: Path) -> None:
    """The same records, step for step (each step once, in order), with the same losses."""
    got, want = metric_records(run), metric_records(reference)
    assert [(r["step"], "eval" in r) for r in got] == [(r["step"], "eval" in r) for r in want]
    steps = [r["step"] for r in got if "loss" in r]
    assert steps == sorted(set(steps))
    assert [r.get("loss") for r in got] == pytest.approx([r.get("loss") for r in want], abs=1e-6)


# --- schedule, groups, config ------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    lr = [optim.lr_at(s, base=1.0, total=10, warmup=4, minimum=0.1) for s in range(11)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lr[4] == pytest.approx(1.0) and lr[7] == pytest.approx(0.55) and lr[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[3:], lr[4:]))


def test_param_groups_exempt_gains_biases_embeddings_and_scale():
    model = create_model(get_config("tiny").replace(vision={"image_size": 32}))
    model.requires_grad_(True)
    groups = optim.param_groups(model, weight_decay=0.2, pretrained={"visual.proj"}, pretrained_lr_scale=0.1)
    ids = {id(p): n for n, p in model.named_parameters()}
    names = {(g["weight_decay"], g["lr_scale"]): {ids[id(p)] for p in g["params"]} for g in groups}
    exempt = names[(0.0, 1.0)]
    for n in (
        "logit_scale",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "visual.class_embedding",
        "visual.ln_pre.weight",
        "text.transformer.resblocks.0.mlp.c_fc.bias",
    ):
        assert n in exempt
    assert "text.transformer.resblocks.0.mlp.c_fc.weight" in names[(0.2, 1.0)]
    assert names[(0.2, 0.1)] == {"visual.proj"}
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))


def test_config_presets_json_and_errors(tmp_path):
    cfg = load_config("tiny", out="x")
    assert cfg.image_size == 32 and cfg.out == "x"
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"preset": "tiny", "lr": 0.01, "data": "m.jsonl"}))
    cfg = load_config(p)
    assert cfg.lr == 0.01 and cfg.data == ("m.jsonl",) and cfg.batch_size == 32
    with pytest.raises(ValueError, match="unknown key.*'lrr'"):
        load_config("tiny", lrr=1)
    with pytest.raises(ValueError, match="unknown training config 'huge'"):
        load_config("huge")
    with pytest.raises(ValueError, match="not divisible by accum_steps"):
        TrainConfig(batch_size=10, accum_steps=3)
    for f in sorted(Path(TESTS.parent / "configs").glob("*.json")):
        load_config(f)  # every shipped config is valid


# --- accumulation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["clip", "sigmoid"])
def test_accumulated_gradient_equals_large_batch_gradient(loss):
    cfg = CLIPConfig.from_dict(MICRO).replace(logit_bias_init=-5.0 if loss == "sigmoid" else None)
    model = create_model(cfg, seed=0).double()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    tokens = torch.zeros(8, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5] = cfg.text.sot_token_id, torch.randint(1, 100, (8, 4))
    tokens[torch.arange(8), 5 + torch.arange(8) % 3] = cfg.text.eot_token_id
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        value = forward_backward(model, images, tokens, loss=loss, accum_steps=accum)
        grads.append((value, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (v1, g1), (v4, g4) = grads
    assert torch.allclose(v1, v4, atol=1e-12)
    for n in g1:
        assert torch.allclose(g1[n], g4[n], atol=1e-10, rtol=1e-8), n
    # Summing per-micro-batch losses instead would give a different gradient: the check is not vacuous.
    model.zero_grad()
    for i, t in zip(images.chunk(4), tokens.chunk(4)):
        out = model(i, t)
        clipforge.loss.contrastive_loss(loss, *out).backward()
    assert not torch.allclose(model.logit_scale.grad, g1["logit_scale"])


# --- a run end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps in one go (checkpoints at 3 and 6)."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_cfg(out, eval_data=None), loader_factory=memory_factory(SAMPLES), captions=CAPTIONS)
    return out


def test_run_directory_and_final_model(straight_run):
    run = straight_run
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["samples_per_s"] > 0 for r in steps)
    assert steps[1]["lr"] == pytest.approx(1e-3)  # end of warm-up
    assert "resumed" not in (run / "log.txt").read_text()
    assert [d.name for d in step_dirs(run)] == ["step-3", "step-6"]
    assert (run / "plots" / "curves.png").stat().st_size > 1000
    model, _, tok = clipforge.load(run / "final")
    _, state = load_state(step_dirs(run)[-1])
    assert max_diff(params(model), params(state["model"])) == 0.0
    assert tok.vocab_size == model.config.text.vocab_size < 600


def test_clean_stop_then_resume_equals_straight_run(straight_run, tmp_path):
    cfg, factory = tiny_cfg(tmp_path, vocab=str(straight_run / "tokenizer")), memory_factory(SAMPLES)
    train(cfg, loader_factory=factory, captions=CAPTIONS, stop_after=3)
    assert [d.name for d in step_dirs(tmp_path)] == ["step-3"] and not (tmp_path / "final").exists()
    train(cfg, loader_factory=factory, captions=CAPTIONS)
    assert "resumed from" in (tmp_path / "log.txt").read_text()
    assert_same_metrics(tmp_path, straight_run)
    _, a = load_state(step_dirs(straight_run)[-1])
    _, b = load_state(step_dirs(tmp_path)[-1])
    # Same numbers to within float32 rounding (in practice bit-identical on one machine).
    assert max_diff(params(a["model"]), params(b["model"])) < 1e-6
    ea, eb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert max(float((ea[k]["exp_avg_sq"] - eb[k]["exp_avg_sq"]).abs().max()) for k in ea) < 1e-9


def test_locked_run_from_feature_cache_resumes_like_a_straight_run(straight_run, tmp_path):
    """Both towers locked, trained from cached trunk outputs: 4 steps (mid-epoch: 3 batches an epoch), a clean
    stop and 2 resumed steps equal 6 straight steps, and the resumed run reads the cache without computing."""
    from clipforge.data.synthetic import write_shapes

    manifest = write_shapes(tmp_path / "shapes", 48, size=32)
    cfg = tiny_cfg(
        tmp_path / "straight",
        data=(str(manifest),),
        vocab=str(straight_run / "tokenizer"),
        lock_image=True,
        lock_text=True,
        unlock_image_blocks=1,
        feature_cache=str(tmp_path / "cache"),
    )
    train(cfg)
    resumed = cfg.replace(out=str(tmp_path / "resumed"))
    train(resumed, stop_after=4)
    assert [d.name for d in step_dirs(tmp_path / "resumed")] == ["step-3", "step-4"]
    train(resumed)
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "image features: 48 cached, 0 computed" in log
    _, a = load_state(step_dirs(tmp_path / "straight")[-1])
    _, b = load_state(step_dirs(tmp_path / "resumed")[-1])
    assert max_diff(params(a["model"]), params(b["model"])) < 1e-6


def _child(out: str, vocab: str) -> None:
    """Run in a subprocess: train 6 steps with a loader that blocks forever at batch 4 (after step 3's
    checkpoint is written), to be killed with SIGKILL."""
    train(tiny_cfg(Path(out), vocab=vocab), loader_factory=memory_factory(SAMPLES, block_from=4))


def test_sigkill_then_resume_equals_straight_run(straight_run, tmp_path):
    # The same vocabulary as the straight run: BPE training breaks ties differently from process to process.
    vocab = straight_run / "tokenizer"
    code = (
        f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent / 'src')!r}]; "
        f"import test_train; test_train._child({str(tmp_path)!r}, {str(vocab)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 120
        while not step_dirs(tmp_path) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # let it reach the blocking batch, mid-epoch, past the checkpoint
        assert proc.poll() is None, "the child exited before it was killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [d.name for d in step_dirs(tmp_path)] == ["step-3"]
    # Killed after step 4 was logged, before it was saved: the resumed run redoes step 4 and logs it once.
    assert [r["step"] for r in metric_records(tmp_path)] == [1, 2, 3, 4]
    train(tiny_cfg(tmp_path, vocab=str(vocab)), loader_factory=memory_factory(SAMPLES))
    _, a = load_state(step_dirs(straight_run)[-1])
    _, b = load_state(step_dirs(tmp_path)[-1])
    assert max_diff(params(a["model"]), params(b["model"])) < 1e-6
    assert_same_metrics(tmp_path, straight_run)


# --- damaged checkpoints ------------------------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: bytes(random_bytes(len(data))),
}


def random_bytes(n: int) -> bytes:
    return (
        torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_past_a_damaged_newest_checkpoint(straight_run, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run, run, ignore=shutil.ignore_patterns("final", "plots"))
    state = run / "checkpoints" / "step-6" / "state.pt"
    state.write_bytes(DAMAGE[damage](state.read_bytes()))
    train(tiny_cfg(run, vocab=str(straight_run / "tokenizer")), loader_factory=memory_factory(SAMPLES))
    log = (run / "log.txt").read_text()
    assert "skipping checkpoint step-6" in log and str(state) in log
    assert f"resumed from {run / 'checkpoints' / 'step-3'} at step 3" in log
    assert "skipping checkpoint step-6" in capsys.readouterr().err  # on the console too
    # It went on from step 3 and redid steps 4-6 exactly as the uninterrupted run did.
    assert_same_metrics(run, straight_run)
    final, _, _ = clipforge.load(run / "final")
    _, reference = load_state(straight_run / "checkpoints" / "step-6")
    assert max_diff(params(final), params(reference["model"])) < 1e-6


def test_no_readable_checkpoint_or_a_broken_explicit_one_is_a_named_error(straight_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight_run / "checkpoints", run / "checkpoints")
    for name, damage in (("step-3", "empty"), ("step-6", "garbage")):
        f = run / "checkpoints" / name / "state.pt"
        f.write_bytes(DAMAGE[damage](f.read_bytes()))
    cfg = tiny_cfg(run, vocab=str(straight_run / "tokenizer"))
    with pytest.raises(ResumeError, match="no readable checkpoint.*step-6.*damaged.*step-3.*empty"):
        train(cfg, loader_factory=memory_factory(SAMPLES))
    assert "skipping checkpoint step-3" in (run / "log.txt").read_text()
    broken = run / "checkpoints" / "step-3"
    from clipforge.cli import main

    argv = [
        "train",
        "--model",
        str(micro_model(tmp_path)),
        "--vocab",
        str(straight_run / "tokenizer"),
        "--device",
        "cpu",
    ]
    argv += ["--data", "unused.jsonl", "--out", str(tmp_path / "other"), "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--resume", str(broken)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"clipforge train: error: {broken / 'state.pt'}: empty file")
        and "Traceback" not in err
    )
    assert main([*argv, "--resume", str(tmp_path / "nowhere")]) == 2
    assert "resume checkpoint not found" in capsys.readouterr().err
    good = straight_run / "checkpoints" / "step-3"  # readable, but made for another model
    other = tiny_cfg(tmp_path / "tiny", model="tiny", image_size=32, vocab=str(straight_run / "tokenizer"))
    with pytest.raises(ResumeError, match=f"{good}: does not fit this run"):
        train(other.replace(resume=str(good)), loader_factory=memory_factory(SAMPLES))


def test_keeping_the_last_checkpoints_never_removes_the_one_just_saved(tmp_path):
    """After falling back from a damaged step-6 to step-3, saving step 4 with keep=1 must keep step-4."""
    state = {"model": {}, "optimizer": {}, "scaler": {}, "rng": [{}]}
    for step in (3, 6):
        save_state(tmp_path, Position(step, 0, step), state, keep=2)
    save_state(tmp_path, Position(4, 0, 4), state, keep=1)
    assert [d.name for d in step_dirs(tmp_path)] == ["step-4", "step-6"]
    assert load_state(step_dirs(tmp_path)[0])[0] == Position(4, 0, 4)


def test_bf16_accumulation_checkpointing_and_sigmoid_run(straight_run, tmp_path):
    cfg = tiny_cfg(
        tmp_path,
        vocab=str(straight_run / "tokenizer"),
        steps=2,
        precision="bf16",
        accum_steps=2,
        grad_checkpointing=True,
        loss="sigmoid",
        local_loss=True,
    )
    train(cfg, loader_factory=memory_factory(SAMPLES))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < 1e3 for v in losses)
    model, _, _ = clipforge.load(tmp_path / "final")
    assert model.logit_bias is not None and model.logit_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(cfg.replace(precision="fp16", out=str(tmp_path / "x")), loader_factory=memory_factory(SAMPLES))


# --- fine-tuning ------------------------------------------------------------------------------------------


def _label_recall(model, tok, samples) -> float:
    """Text -> image recall@1 by class: for each class's caption, is the most similar image of that class?"""
    pre = Preprocess(model.config.preprocess)
    with torch.no_grad():
        img = model.encode_image(pre.batch([s.image for s in samples]), normalize=True)
        labels = sorted({s.label for s in samples})
        txt = model.encode_text(tok([f"a sketch showing {lb}" for lb in labels]), normalize=True)
    best = (txt @ img.t()).argmax(dim=1)
    return sum(samples[int(b)].label == lb for b, lb in zip(best, labels)) / len(labels)


class NewCaptions:
    """The same shapes with a caption wording the model never saw."""

    def __init__(self, s):
        self.image, self.label = s.image, s.label
        self.captions = [f"a sketch showing {s.label}"] * 3


def test_finetune_from_fp16_file_raises_recall_and_locks_the_image_tower(tmp_path):
    base = create_model(CLIPConfig.from_dict(MICRO), seed=1)
    tok = clipforge.train_tokenizer(CAPTIONS + [c for s in SAMPLES for c in NewCaptions(s).captions], 600, 16)
    base = create_model(
        base.config.replace(
            text={
                "vocab_size": tok.vocab_size,
                "sot_token_id": tok.sot_token_id,
                "eot_token_id": tok.eot_token_id,
            }
        ),
        seed=1,
    )
    from safetensors.torch import save_file

    from clipforge.model import convert

    sd = {k: v.half().contiguous() for k, v in convert.to_openai(base.state_dict()).items()}
    save_file(sd, tmp_path / "base.safetensors")  # an fp16 OpenAI-layout state dict, as OpenAI ships them
    tok.save(tmp_path / "vocab")
    new = [NewCaptions(s) for s in SAMPLES]
    before_model, _, _ = clipforge.load(tmp_path / "base.safetensors", vocab=tmp_path / "vocab")
    before = _label_recall(before_model, tok, new)
    cfg = tiny_cfg(
        tmp_path / "run",
        init=str(tmp_path / "base.safetensors"),
        vocab=str(tmp_path / "vocab"),
        steps=40,
        checkpoint_every=40,
        lock_image=True,
        lock_image_norm_trainable=True,
        pretrained_lr_scale=0.5,
        lr=4e-3,
        log_every=10,
    )
    run = train(cfg, loader_factory=memory_factory(new))
    _, state = load_state(step_dirs(run)[-1])
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 master weights
    after_model, _, _ = clipforge.load(run / "final")
    after = _label_recall(after_model, tok, new)
    chance = 1 / 24
    assert after >= 3 * chance and after >= before + 3 * chance, (before, after)
    b, a = params(before_model), params(after_model)
    assert torch.equal(b["visual.conv1.weight"], a["visual.conv1.weight"])  # the trunk is locked
    assert not torch.equal(b["visual.proj"], a["visual.proj"])  # the head (projection) trains
    assert not torch.equal(b["visual.ln_post.weight"], a["visual.ln_post.weight"])  # norm layers trainable
    assert not torch.equal(b["text.text_projection"], a["text.text_projection"])
    assert (
        F.cosine_similarity(b["text.text_projection"].flatten(), a["text.text_projection"].flatten(), 0) > 0.5
    )


def test_cli_train_and_plot(straight_run, tmp_path):
    from clipforge.cli import main
    from clipforge.data.synthetic import write_shapes

    manifest = write_shapes(tmp_path / "data", 32, size=32)
    code = main(
        [
            "train",
            "--config",
            "tiny",
            "--model",
            str(micro_model(tmp_path)),
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "run"),
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--no-progress",
            "--eval-data",
            str(manifest),
            "--vocab",
            str(straight_run / "tokenizer"),
        ]
    )
    assert code == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in records)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()
    clipforge.load(tmp_path / "run" / "final")


def test_bad_samples_are_reported_in_the_run_log(straight_run, tmp_path, capsys):
    """Bad samples met by any loader worker reach log.txt (and the console): a count and the reasons."""
    from clipforge.cli import main
    from clipforge.data.synthetic import write_shapes

    manifest = write_shapes(tmp_path / "data", 32, size=32)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    images[0].write_bytes(b"not an image")
    images[1].write_bytes(b"")
    images[2].unlink()
    argv = ["train", "--config", "tiny", "--model", str(micro_model(tmp_path)), "--data", str(manifest)]
    argv += ["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "16", "--workers", "2"]
    argv += ["--max-bad-fraction", "0.5", "--no-progress", "--vocab", str(straight_run / "tokenizer")]
    assert main(argv) == 0
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "epoch 0: skipped 3 bad of 35 samples read" in log  # one epoch: 32 positions + 3 replacements
    for image, why in zip(images, ("not a recognised image", "empty file", "cannot open (No such file")):
        assert f"{image}: {why}" in log
    assert "skipped 3 bad" in capsys.readouterr().err


def test_vocabulary_captions_are_read_like_the_loader_reads_them(tmp_path):
    """A from-scratch run trains its vocabulary on the same captions the loader yields, for shards too."""
    from clipforge.data.manifest import read_manifest
    from clipforge.data.shards import write_shards
    from clipforge.data.synthetic import write_shapes
    from clipforge.train.vocab import read_captions

    manifest = write_shapes(tmp_path / "shapes", 12, size=16)
    expected = [c for s in read_manifest(manifest) for c in s.captions]
    assert read_captions([manifest]) == expected
    write_shards(manifest, tmp_path / "shards", shard_size=5)
    assert sorted(read_captions([tmp_path / "shards"])) == sorted(expected)
    assert read_captions([manifest], limit=4) == expected[:4]


def test_finetune_at_a_longer_context_stretches_the_positions(tmp_path):
    # Long-CLIP's recipe: --init a model, --context-length longer than its own; the run starts from the
    # stretched position embeddings and its final model reads texts of the new length.
    tok = clipforge.train_tokenizer(CAPTIONS, 600, 24)
    cfg = CLIPConfig.from_dict(MICRO).replace(
        text={
            "context_length": 24,
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
        }
    )
    clipforge.save_model(create_model(cfg, seed=2), tmp_path / "base", tokenizer=tok)
    run = train(
        tiny_cfg(
            tmp_path / "run", init=str(tmp_path / "base"), context_length=44, steps=2, checkpoint_every=2
        ),
        loader_factory=memory_factory(SAMPLES),
    )
    model, _, tok2 = clipforge.load(run / "final")
    assert model.config.text.context_length == 44 and tok2.context_length == 44
    long_text = " ".join(CAPTIONS[:8])
    assert int((tok2([long_text])[0] != 0).sum()) > 24  # tokens past the old context reach the model
    with torch.no_grad():
        assert torch.isfinite(model.encode_text(tok2([long_text]))).all()
