"""`clipforge embed --ray`: the embedding pipeline on Ray Data, same inputs, same output folder.

    driver: list items, cut parts, sidecar (embed.plan)   ->  ray.data.from_items(rows of unfinished parts)
    map_batches(decode_rows)          CPU tasks: read, hash, decode (fast JPEG), preprocess -> pixels
    map_batches(EmbedActor, pool)     one actor per GPU (one on a CPU-only cluster): image + caption vectors
    driver: iter_batches in input order (preserve_order) -> PartAssembler -> numbered parts + done-markers

Per-item work is embed.decode_item and Encoder.embed_pixels, exactly as in the single-process pipeline, so
the two outputs agree up to float rounding from different batch sizes. Only vectors (2 KB per image at
512-d) travel back to the driver; pixels stay between the decode tasks and the actors.

Without RAY_ADDRESS (or address=) a local instance is started on 127.0.0.1 and shut down at the end.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipforge.media.video import Sampling

from . import embed_output as eo
from .embed import PartAssembler, _check, _summary, bulk_preprocess, decode_item, plan
from .sources import Item

DECODE_CPUS = 0.5  # fractional, so decode tasks never starve the read and write tasks on a small node


def decode_rows(batch: dict, preprocess) -> dict:
    """Ray task: a batch of item rows -> the same rows plus pixels (n, 3, S, S) and status ('' = decoded)."""
    s = preprocess.config.image_size
    n = len(batch["i"])
    pixels = np.zeros((n, 3, s, s), np.float32)
    status, sha = [], []
    for r in range(n):
        t, failed = float(batch["t"][r]), str(batch["failed"][r])
        item = Item(
            str(batch["key"][r]),
            str(batch["path"][r]),
            int(batch["offset"][r]),
            int(batch["length"][r]),
            t=None if t < 0 else t,
            failed=failed or None,
        )
        x, st, h, _, _ = decode_item(item, preprocess)
        if x is not None:
            pixels[r] = x.numpy()
        status.append(st or "")
        sha.append(h or "")
    return {
        "i": batch["i"],
        "caption": batch["caption"],
        "status": np.array(status, object),
        "sha": np.array(sha, object),
        "pixels": pixels,
    }


class EmbedActor:
    """Holds one model (on the actor's GPU when it has one) and embeds decoded batches and their captions."""

    def __init__(self, model: str, vocab: str | None, captions: bool) -> None:
        import torch

        from clipforge.encoder import Encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = Encoder.load(model, vocab=vocab, device=device)
        self.captions = captions

    def __call__(self, batch: dict) -> dict:
        import torch

        ok = np.array([s == "" for s in batch["status"]], bool)
        vec = np.zeros((len(ok), self.encoder.dim), np.float32)
        if ok.any():
            vec[ok] = self.encoder.embed_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        txt = np.zeros_like(vec)
        if self.captions and ok.any():
            txt[ok] = self.encoder.embed_texts([str(c) for c in batch["caption"][ok]])
        return {"i": batch["i"], "status": batch["status"], "sha": batch["sha"], "vec": vec, "txt": txt}


def loopback_env(local: bool) -> None:
    """Environment for Ray, set before `import ray` (it reads these at import time). With
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 every Ray process of a local instance uses 127.0.0.1 instead of the
    machine's network address; the worker processes inherit it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _start_ray(address: str | None, num_cpus: float | None) -> bool:
    """Connect to a cluster, or start a local instance on loopback. Returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        import clipforge

        # Workers of a local instance import clipforge from where this process found it (a source tree too).
        src = str(Path(clipforge.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",  # loopback only: a local instance needs no network
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    return True


def _rows(parts: list[list[Item]], todo: list[int]) -> list[dict]:
    rows = []
    starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    for p in todo:
        for j, it in enumerate(parts[p]):
            rows.append(
                {
                    "i": int(starts[p] + j),
                    "key": it.key,
                    "path": it.path,
                    "offset": it.offset,
                    "length": it.length,
                    "caption": it.caption or "",
                    # a video's moment in seconds, -1 for an image: a column of one type, no None
                    "t": -1.0 if it.t is None else it.t,
                    "failed": it.failed or "",
                }
            )
    return rows


def embed_with_ray(
    inputs: str | Path | Sequence[str | Path],
    model: str,
    out: str | Path,
    *,
    vocab: str | None = None,
    part_size: int = 100_000,
    batch_size: int = 64,
    exact_decode: bool = False,
    dtype: str = "float16",
    actors: int | None = None,
    address: str | None = None,
    num_cpus: float | None = None,
    video_interval: float | None = None,
    video_max_frames: int | None = None,
) -> eo.EmbedSummary:
    """`embed_to_folder` on Ray Data. `model` is a checkpoint path every Ray worker can read."""
    loopback_env(local=not (address or os.environ.get("RAY_ADDRESS")))
    import ray
    from ray.data import ActorPoolStrategy

    from clipforge.encoder import Encoder

    _check(batch_size, part_size, dtype)
    sampling = Sampling.of(video_interval, video_max_frames)
    out = Path(out)
    model = str(Path(model).absolute()) if Path(model).exists() else model
    enc = Encoder.load(model, vocab=vocab)  # the driver needs the identity and preprocessing, not the GPU
    items, parts, done = plan(inputs, enc.identity, enc.dim, out, part_size, dtype, exact_decode, sampling)
    todo = [p for p in range(len(parts)) if p not in done]
    captions = eo.read_sidecar(out)["captions"]
    part_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    started = _start_ray(address, num_cpus)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n_actors = actors or max(gpus, 1)
        ds = ray.data.from_items(_rows(parts, todo)) if todo else None
        asm = PartAssembler(out, parts, todo, captions, dtype, enc.embed_texts)
        if ds is not None:
            ds = ds.map_batches(
                decode_rows,
                fn_kwargs={"preprocess": bulk_preprocess(enc.preprocess, exact_decode)},
                batch_size=batch_size,
                num_cpus=DECODE_CPUS,
                batch_format="numpy",
            )
            ds = ds.map_batches(
                EmbedActor,
                fn_constructor_kwargs={"model": model, "vocab": vocab, "captions": captions},
                compute=ActorPoolStrategy(size=n_actors),
                batch_size=batch_size,
                batch_format="numpy",
                num_gpus=1 if gpus else 0,
                num_cpus=DECODE_CPUS if not gpus else 1,
            )
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i, st, sha, v, t in zip(b["i"], b["status"], b["sha"], b["vec"], b["txt"]):
                    ok = st == ""
                    asm.add(
                        int(part_of[i]),
                        items[int(i)],
                        v if ok else None,
                        sha or None,
                        st or None,
                        t if ok and captions else None,
                    )
    finally:
        if started:
            ray.shutdown()
    return _summary(out, len(items), len(parts), len(done))
