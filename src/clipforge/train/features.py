"""The feature cache of locked towers: each tower's trunk output, computed once per distinct input, kept on disk.

    CACHE/features/image-<id>/meta.json          what made these features: tower class, trunk fingerprint,
                                                 unlocked blocks, preprocessing, dtype
    CACHE/features/image-<id>/part-<uid>.safetensors   rows of trunk output ("out.0", "out.1", ...) and, in
                                                 the file's metadata, the key of each row
    CACHE/features/text-<id>/...                 the same for the text tower (the tokenizer in meta.json)

A folder (a namespace) is named by the hash of its meta.json, so another tower, other weights below the
unlocked blocks, another number of unlocked blocks, other preprocessing or another tokenizer make a new folder
and nothing stale is read. Inside it a row's key is the sha256 of the image file's bytes, or of the caption:
an edited image or caption gets a new key and only that row is computed again. Rows are stored in fp32 (the
pooled features of a small tower are a few KiB an image).

A part is written to a temporary name and renamed when complete, so a killed build keeps every finished part
and the next build computes only what is missing; a build with nothing missing reads and hashes, nothing more.
Two builds running at once may both compute a row; either copy is right.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.atomic import atomic_path, write_bytes_atomic
from clipforge.data.manifest import Sample
from clipforge.model.config import HEAD_FIELDS, CLIPConfig, PreprocessConfig
from clipforge.model.tower import TrunkOutput
from clipforge.transforms import Preprocess

FORMAT = 1
PART_ROWS = 2048  # rows per part file: what a killed build can lose
BATCH = 64  # inputs per trunk call while building
DTYPE = torch.float32


class FeatureCacheError(ValueError):
    """A feature cache that cannot be used: a folder whose description does not match, unreadable parts."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_tuple(feats: TrunkOutput) -> tuple[torch.Tensor, ...]:
    return feats if isinstance(feats, tuple) else (feats,)


def from_tuple(parts: Sequence[torch.Tensor]) -> TrunkOutput:
    """What `tower.head` takes: a lone tensor as itself, several as a tuple."""
    return parts[0] if len(parts) == 1 else tuple(parts)


def trunk_fingerprint(tower: nn.Module, config: dict[str, Any]) -> str:
    """sha256 over the tower's class, its config and every state entry that is not trainable (the locked
    trunk's weights and buffers); the head's weights change while training and are left out."""
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    h = hashlib.sha256(json.dumps([type(tower).__qualname__, config], sort_keys=True, default=str).encode())
    for name, t in sorted(tower.state_dict().items()):
        if name not in trainable:
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Texts whose token ids tell tokenizers apart beyond their vocabularies: case, accents, spacing, symbols.
PROBE_TEXTS = (
    "A Photo of CAFÉ's 2 dogs!",
    "naïve   spacing\tand\nlines -- ok?",
    "日本語 テキスト 🙂 <b>x</b>",
)


def tokenizer_identity(tok: Callable[[Sequence[str]], torch.Tensor]) -> str:
    """sha256 over a tokenizer's class, context length, vocabulary, merges and its ids for a few probe texts:
    with the caption, what decides the ids a text row was computed from."""
    h = hashlib.sha256()
    for part in (
        type(tok).__qualname__,
        getattr(tok, "context_length", None),
        sorted(getattr(tok, "vocab", {}).items()),
        [list(m) for m in getattr(tok, "merges", [])],
        tok(list(PROBE_TEXTS)).tolist(),
    ):
        h.update(json.dumps(part, ensure_ascii=False).encode())
    return h.hexdigest()


def image_store(root: str | Path, tower: nn.Module, config: CLIPConfig, unlocked: int) -> FeatureStore:
    """The namespace of an image tower's trunk outputs: its class, trunk weights, config, unlocked blocks and
    the preprocessing."""
    d = config.to_dict()
    # The head's own options do not change what the trunk computes: rows cached for a linear head serve an
    # MLP head too.
    vision = {k: v for k, v in d["vision"].items() if k not in HEAD_FIELDS}
    return FeatureStore(
        root,
        {
            "kind": "image",
            "tower": type(tower).__qualname__,
            "trunk": trunk_fingerprint(tower, {"vision": vision, "activation": config.activation}),
            "unlocked": unlocked,
            "preprocess": d["preprocess"],
        },
    )


def text_store(
    root: str | Path, tower: nn.Module, config: CLIPConfig, tokenizer: Any, unlocked: int
) -> FeatureStore:
    """The namespace of a text tower's trunk outputs: its class, trunk weights, config, unlocked blocks and the
    tokenizer; a row's key is its caption's."""
    return FeatureStore(
        root,
        {
            "kind": "text",
            "tower": type(tower).__qualname__,
            "trunk": trunk_fingerprint(
                tower, {"text": config.to_dict()["text"], "activation": config.activation}
            ),
            "unlocked": unlocked,
            "tokenizer": tokenizer_identity(tokenizer),
        },
    )


class FeatureStore:
    """One namespace of the cache: a folder of parts, each a block of rows with their keys."""

    def __init__(self, root: str | Path, meta: dict[str, Any]) -> None:
        meta = {"format": FORMAT, "dtype": str(DTYPE), **meta}
        text = json.dumps(meta, sort_keys=True, indent=1)
        self.dir = Path(root) / f"{meta['kind']}-{_sha256(text.encode())[:16]}"
        self.meta = meta
        self._text = text
        described = self.dir / "meta.json"
        if described.exists() and json.loads(described.read_text()) != json.loads(text):
            raise FeatureCacheError(
                f"{described}: describes other features than this run's; delete {self.dir}"
            )

    def _make(self) -> None:
        """The folder and its meta.json, made by the first write (a lookup in a read-only cache, or of a
        tower nothing was cached for, leaves no trace)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        described = self.dir / "meta.json"
        if not described.exists():
            write_bytes_atomic(described, (self._text + "\n").encode())

    def parts(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.safetensors"))

    def index(self) -> dict[str, tuple[Path, int]]:
        """key -> (part, row) over every complete part."""
        from safetensors import safe_open

        out: dict[str, tuple[Path, int]] = {}
        for part in self.parts():
            try:
                with safe_open(str(part), framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
            except Exception as e:  # a part is only ever renamed into place whole; this one was damaged later
                raise FeatureCacheError(
                    f"{part}: unreadable feature part ({e}); delete it to recompute"
                ) from e
            for row, key in enumerate(keys):
                out.setdefault(key, (part, row))
        return out

    def write(self, keys: Sequence[str], rows: Sequence[torch.Tensor]) -> Path:
        """Store rows (each tensor (len(keys), ...)) as one part, atomically."""
        from safetensors.torch import save_file

        tensors = {
            f"out.{i}": t.detach().to("cpu", DTYPE if t.is_floating_point() else t.dtype).contiguous()
            for i, t in enumerate(rows)
        }
        self._make()
        name = f"part-{uuid.uuid4().hex[:16]}"
        final = self.dir / f"{name}.safetensors"
        with atomic_path(final) as tmp:
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(list(keys))})
        return final

    def read(self, keys: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """The rows of `keys`, in that order (a key may repeat): a tuple of tensors (len(keys), ...)."""
        from safetensors.torch import load_file

        index = self.index()
        missing = [k for k in keys if k not in index]
        if missing:
            raise FeatureCacheError(f"{self.dir}: {len(missing)} rows missing (first key {missing[0]})")
        by_part: dict[Path, list[int]] = {}
        for i, k in enumerate(keys):
            by_part.setdefault(index[k][0], []).append(i)
        out: list[torch.Tensor] | None = None
        for part, positions in by_part.items():
            loaded = load_file(str(part))
            blocks = [loaded[f"out.{j}"] for j in range(len(loaded))]
            if out is None:
                out = [torch.empty(len(keys), *b.shape[1:], dtype=b.dtype) for b in blocks]
            rows = torch.tensor([index[keys[i]][1] for i in positions])
            at = torch.tensor(positions)
            for o, b in zip(out, blocks):
                o[at] = b[rows]
        if out is None:
            raise FeatureCacheError(f"{self.dir}: no rows asked for")
        return tuple(out)


@dataclass
class BuildStats:
    cached: int = 0  # distinct inputs already in the store
    computed: int = 0  # distinct inputs computed by this build
    bad: int = 0  # inputs that could not be read
    examples: list[str] = field(default_factory=list)  # a few bad inputs, named
    seconds: float = 0.0

    def note_bad(self, message: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(message)


@contextlib.contextmanager
def eval_mode(tower: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm statistics used, not updated); each module's own mode comes back after."""
    modes = {m: m.training for m in tower.modules()}
    tower.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def _inference(tower: nn.Module, full_length: bool) -> Iterator[None]:
    """Eval mode with no autograd; `full_length` turns a text tower's `trim` off so that every batch's hidden
    states have one shape."""
    trim = getattr(tower, "trim", None)
    if trim is not None and full_length:
        tower.trim = False
    try:
        with eval_mode(tower), torch.inference_mode():
            yield
    finally:
        if trim is not None:
            tower.trim = trim


class _Writer:
    """Runs the trunk over queued inputs BATCH at a time and writes a part every PART_ROWS rows."""

    def __init__(
        self, store: FeatureStore, trunk: Callable[[torch.Tensor], TrunkOutput], batch: int, part_rows: int
    ):
        self.store, self.trunk, self.batch, self.part_rows = store, trunk, batch, part_rows
        self.keys: list[str] = []
        self.inputs: list[torch.Tensor] = []
        self.done_keys: list[str] = []
        self.done: list[tuple[torch.Tensor, ...]] = []
        self.written = 0

    def add(self, key: str, x: torch.Tensor) -> None:
        self.keys.append(key)
        self.inputs.append(x)
        if len(self.inputs) >= self.batch:
            self._run()

    def _run(self) -> None:
        if self.inputs:
            out = as_tuple(self.trunk(torch.stack(self.inputs)))
            self.done.append(tuple(t.clone() for t in out))
            self.done_keys += self.keys
            self.keys, self.inputs = [], []
        if len(self.done_keys) >= self.part_rows:
            self._flush()

    def _flush(self) -> None:
        if self.done_keys:
            rows = [torch.cat([d[i] for d in self.done]) for i in range(len(self.done[0]))]
            self.store.write(self.done_keys, rows)
            self.written += len(self.done_keys)
            self.done_keys, self.done = [], []

    def close(self) -> None:
        self._run()
        self._flush()


# ------------------------------------------------------------------------------------------------- images


def _items(samples: Sequence[Sample]) -> list[Any]:
    from clipforge.index.sources import Item

    return [Item(s.key, s.image) for s in samples]


def decode(samples: Sequence[Sample], preprocess: Preprocess) -> torch.Tensor:
    """(N, 3, S, S) pixels of the samples' image files, decoded as the loader and the cache decode them. Raises
    BadDataError for an unreadable one."""
    from clipforge.data.loader import BadDataError
    from clipforge.index.embed import decode_item

    out = []
    for item in _items(samples):
        x, status, *_ = decode_item(item, preprocess)
        if x is None:
            raise BadDataError(f"{item.key}: {status}")
        out.append(x)
    return torch.stack(out)


def build_image_features(
    store: FeatureStore,
    tower: nn.Module,
    unlocked: int,
    samples: Sequence[Sample],
    preprocess: PreprocessConfig,
    *,
    workers: int = 0,
    batch: int = BATCH,
    part_rows: int = PART_ROWS,
    progress: bool = False,
) -> tuple[list[str | None], BuildStats]:
    """Make sure `store` holds the trunk output of every readable sample's image; -> (each sample's key, the
    sha256 of its file, or None for an unreadable sample; what the build did). Loader workers read, hash and
    decode (only images whose key is not stored yet, through the embedding pipeline's decoder); the trunk runs
    here. A sample without a caption is unreadable, as the loader counts it."""
    import time

    from tqdm import tqdm

    from clipforge.index.embed import UNCHANGED, chunks, decode_batches

    t0, stats = time.perf_counter(), BuildStats()
    stored = set(store.index())
    keys: list[str | None] = [None] * len(samples)
    writer = _Writer(store, lambda x: tower.trunk(x, unlocked), batch, part_rows)
    queued: set[str] = set()
    ok = [i for i, s in enumerate(samples) if s.captions]
    for i in sorted(set(range(len(samples))) - set(ok)):
        stats.note_bad(f"{samples[i].key}: no caption")
    batches = chunks(_items([samples[i] for i in ok]), batch)
    decoded = decode_batches(batches, Preprocess(preprocess), workers, {samples[i].key: stored for i in ok})
    bar = tqdm(total=len(ok), desc="image features", unit="img", disable=not progress, dynamic_ncols=True)
    with _inference(tower, full_length=False):
        for at, (items, done) in enumerate(zip(batches, decoded)):
            pixels = iter(done.pixels)
            for j, (item, status, sha) in enumerate(zip(items, done.status, done.sha256)):
                i = ok[at * batch + j]
                if status is None:
                    x = next(pixels)
                    if sha not in queued:
                        queued.add(sha)
                        writer.add(sha, x)
                elif status != UNCHANGED:
                    stats.note_bad(f"{item.key}: {status}")
                    continue
                keys[i] = sha
            bar.update(len(items))
        writer.close()
    bar.close()
    stats.computed = writer.written
    stats.cached = len({k for k in keys if k is not None} - queued)
    stats.seconds = time.perf_counter() - t0
    return keys, stats


# --------------------------------------------------------------------------------------------------- text


def text_key(caption: str) -> str:
    return _sha256(caption.encode("utf-8"))


def build_text_features(
    store: FeatureStore,
    tower: nn.Module,
    unlocked: int,
    captions: Sequence[str],
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    *,
    batch: int = BATCH,
    part_rows: int = PART_ROWS,
    progress: bool = False,
) -> tuple[list[str], BuildStats]:
    """Make sure `store` holds the trunk output of every caption; -> (each caption's key, what the build did).
    Only captions not stored yet are tokenized (tokenizing is most of the time a warm cache would take)."""
    import time

    from tqdm import tqdm

    t0, stats = time.perf_counter(), BuildStats()
    keys = [text_key(c) for c in captions]
    stored = set(store.index())
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    todo = [i for k, i in first.items() if k not in stored]
    tokens = tokenizer([captions[i] for i in todo]) if todo else torch.zeros(0, 1, dtype=torch.long)  # (n, T)
    # Similar lengths together: a trimmed tower then runs each batch only up to its longest caption.
    order = (tokens != 0).sum(dim=1).argsort(stable=True).tolist()
    writer = _Writer(store, lambda x: tower.trunk(x, unlocked), batch, part_rows)
    bar = tqdm(
        total=len(todo), desc="text features", unit="caption", disable=not progress, dynamic_ncols=True
    )
    # Pooled features (unlocked = 0) have one shape whatever the length, so a trimming tower may trim.
    with _inference(tower, full_length=unlocked > 0):
        for j in order:
            writer.add(keys[todo[j]], tokens[j])
            bar.update(1)
        writer.close()
    bar.close()
    stats.computed, stats.cached = writer.written, len(first) - len(todo)
    stats.seconds = time.perf_counter() - t0
    return keys, stats
