"""Collections from embedding folders (`clipforge embed` output), without re-embedding and without holding
all vectors in memory: parts are memory-mapped and stored a chunk at a time.

`add_embedding_folder` adds a folder to any collection (the model identity in the folder's sidecar must be
the collection's). `add_sources` adds manifests and shards by embedding them into such a folder first, inside
the collection's scratch folder. `build_ivfpq` makes a new IVF-PQ collection: it trains the quantisers on a
sample drawn across all parts, then adds every vector in chunks, so peak memory is the sample plus one chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipforge.data.sources import EmbeddingPart, read_embeddings

from . import ann
from . import embed_output as eo
from .changes import commit_changed
from .store import Store
from .types import AddReport, ModelMismatchError, identity_name, same_model

CHUNK = 65_536
MAX_TRAIN = 2_000_000  # training sample cap: ~4 GB of 512-d float32, enough for 65,536 lists x ~30 points


def check_folder_model(coll: Store, folder: Path, side: dict) -> None:
    ident = {**side["model"], "dim": side["dim"]}
    if not same_model(coll.identity, ident):
        raise ModelMismatchError(
            f"embedding folder {folder} was made with {identity_name(ident)}, but collection {coll.path} "
            f"holds {identity_name(coll.identity)}; embed with the collection's model or use another collection"
        )


def _records(part: EmbeddingPart) -> list[dict]:
    """The collection rows of a part: the first caption, the content hash apart from the other metadata."""
    return [
        {
            "path": key,
            "caption": caps[0] if caps else None,
            "sha256": meta.get("sha256"),
            "metadata": {k: v for k, v in meta.items() if k != "sha256"},
        }
        for key, caps, meta in zip(part.keys, part.captions, part.metadata)
    ]


def add_embedding_folder(coll: Store, folder: str | Path, chunk: int = CHUNK) -> AddReport:
    """Store every vector of an embedding folder with its metadata; rows already stored under the same
    image_path and sha256 are skipped, changed ones replaced (as `Collection.add` does for files)."""
    folder = Path(folder)
    side = eo.read_sidecar(folder)
    check_folder_model(coll, folder, side)
    report = AddReport(failed=[(k, r) for k, r in eo.collect_skipped(folder)])
    with coll.counting_commits():
        for part in read_embeddings(folder):
            rows = _records(part)
            for start in range(0, len(rows), chunk):
                x = np.asarray(part.vectors[start : start + chunk], np.float32)
                # float16 storage: commit_changed renormalises
                commit_changed(coll, x, rows[start : start + chunk], report)
    return report


def add_sources(
    coll: Store,
    inputs: Sequence[str | Path],
    encoder,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    exact_decode: bool = False,
    progress: bool = False,
) -> AddReport:
    """Add JSONL/CSV/TSV manifests and webdataset shards: the bulk pipeline (embed.py) embeds them into an
    embedding folder under `coll.scratch()`, which is then stored and removed. Nothing is written outside
    the collection folder, and a killed process leaves only scratch that the next open removes."""
    from .embed import embed_to_folder

    coll.check_encoder(encoder)
    with coll.scratch() as tmp:
        embed_to_folder(
            inputs,
            encoder,
            tmp / "emb",
            batch_size=batch_size,
            workers=workers,
            exact_decode=exact_decode,
            dtype="float32",
            progress=progress,
        )
        return add_embedding_folder(coll, tmp / "emb")


def sample_vectors(folder: Path, n: int, seed: int = 0) -> np.ndarray:
    """Up to `n` vectors (n, D) float32 drawn uniformly across all parts, reading only the rows drawn."""
    parts = [p.vectors for p in read_embeddings(folder)]
    sizes = np.array([len(v) for v in parts])
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for p, v in enumerate(parts):
        local = pick[(pick >= starts[p]) & (pick < starts[p + 1])] - starts[p]
        if len(local):
            out.append(np.asarray(v[local], np.float32))  # fancy indexing a memmap reads just these rows
    return np.concatenate(out)


def build_ivfpq(
    folder: str | Path, out: str | Path, *, chunk: int = CHUNK, max_train: int = MAX_TRAIN, seed: int = 0
) -> Store:
    """A new IVF-PQ collection at `out` holding every vector of the embedding folder. Returns it open."""
    folder = Path(folder)
    side = eo.read_sidecar(folder)
    total = sum(len(p.vectors) for p in read_embeddings(folder))
    if total < 2 * 39 * 16:  # too few to train even 16 lists
        raise ValueError(f"{folder} holds {total} vectors; IVF-PQ needs at least {2 * 39 * 16}")
    coll = Store.create(out, identity=side["model"], dim=int(side["dim"]), index="ivfpq")
    try:
        n_train = min(total, max_train, max(64 * ann.ivf_lists(total, total), 100_000))
        coll.train_index(sample_vectors(folder, n_train, seed), total)
        add_embedding_folder(coll, folder, chunk)
        coll.save()
    except BaseException:
        coll.close()
        raise
    return coll
