"""The embedding folder: clip-retrieval's inference layout plus a sidecar and per-part done-markers.

    embeddings.json               what made it: model identity, dim, dtype, part size, input fingerprint
    img_emb/img_emb_<i>.npy       (n_i, D) image embeddings, L2-normalised (float16 by default, as clip-retrieval)
    text_emb/text_emb_<i>.npy     (n_i, D) caption embeddings, when every input has a caption
    metadata/metadata_<i>.parquet one row per vector: image_path, caption, sha256, then the input's metadata keys
    _done/part_<i>.json           written last for part i: its row count and skipped files with reasons

Part numbers are zero-padded to the digits of the part count, as clip-retrieval pads them, so a sorted file
listing is the input order. A part is finished iff its marker exists; a rerun redoes only unfinished parts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipforge.atomic import write_atomic

from .types import WriteError

SIDECAR = "embeddings.json"
FORMAT = "clipforge-embeddings/1"
DTYPES = ("float16", "float32")


class EmbeddingFolderError(ValueError):
    """An embedding folder that is missing parts, malformed, or was made by another model or input."""


@dataclass
class EmbedSummary:
    out: str
    items: int = 0
    embedded: int = 0
    parts: int = 0
    parts_done_before: int = 0  # finished by an earlier (interrupted) run and skipped this time
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image_path, reason)

    def to_dict(self) -> dict:
        return {**self.__dict__, "skipped": [{"image_path": k, "reason": r} for k, r in self.skipped]}


def part_name(i: int, n_parts: int) -> str:
    return str(i).zfill(len(str(max(n_parts, 1))))


def input_fingerprint(keys: Sequence[str], part_size: int) -> str:
    h = hashlib.sha256(str(part_size).encode())
    for k in keys:
        h.update(k.encode("utf-8", "surrogatepass") + b"\0")
    return "sha256:" + h.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    write_atomic(
        path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()), error=WriteError
    )


def prepare(out: Path, header: dict) -> set[int]:
    """Create `out` with its sidecar, or check a previous run's sidecar matches; returns finished parts."""
    _mkdir(out, parents=True)
    side = out / SIDECAR
    if side.exists():
        old = read_sidecar(out)
        for key in ("model", "dim", "dtype", "part_size", "input", "captions"):
            if old.get(key) != header.get(key):
                raise EmbeddingFolderError(
                    f"{out} holds embeddings of another run ({key}: {old.get(key)!r} there, "
                    f"{header.get(key)!r} now); use a new --out folder or delete it"
                )
    else:
        write_json(side, header)
    for sub in ("img_emb", "metadata", "_done") + (("text_emb",) if header["captions"] else ()):
        _mkdir(out / sub)
    return done_parts(out)


def _mkdir(folder: Path, parents: bool = False) -> None:
    try:
        folder.mkdir(parents=parents, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create {folder}: {e.strerror or e}") from e


def done_parts(out: Path) -> set[int]:
    d = out / "_done"
    return {int(p.stem.split("_")[1]) for p in d.glob("part_*.json")} if d.is_dir() else set()


def _table(rows: list[dict]):
    import pyarrow as pa

    cols: dict[str, list] = {"image_path": [], "caption": [], "sha256": []}
    for r in rows:
        for k in r:
            cols.setdefault(k, [])
    for r in rows:
        for k, v in cols.items():
            x = r.get(k)
            v.append(json.dumps(x) if isinstance(x, (dict, list)) else x)
    arrays = {}
    for k, v in cols.items():
        try:
            arrays[k] = pa.array(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types, ints past 64 bits: text
            arrays[k] = pa.array([None if x is None else str(x) for x in v], pa.string())
    return pa.table(arrays)


def write_part(
    out: Path,
    i: int,
    n_parts: int,
    img: np.ndarray,
    text: np.ndarray | None,
    rows: list[dict],
    skipped: list[tuple[str, str]],
    dtype: str,
) -> None:
    """Part i: vectors (n, D), caption vectors (n, D) or None, one metadata row each; the marker goes last."""
    import pyarrow.parquet as pq

    name = part_name(i, n_parts)
    write_atomic(
        out / "img_emb" / f"img_emb_{name}.npy", lambda f: np.save(f, img.astype(dtype)), error=WriteError
    )
    if text is not None:
        write_atomic(
            out / "text_emb" / f"text_emb_{name}.npy",
            lambda f: np.save(f, text.astype(dtype)),
            error=WriteError,
        )
    table = _table(rows)
    write_atomic(
        out / "metadata" / f"metadata_{name}.parquet", lambda f: pq.write_table(table, f), error=WriteError
    )
    write_json(
        out / "_done" / f"part_{name}.json", {"rows": len(rows), "skipped": [list(s) for s in skipped]}
    )


def read_sidecar(folder: Path) -> dict:
    try:
        side = json.loads((Path(folder) / SIDECAR).read_text())
    except FileNotFoundError:
        raise EmbeddingFolderError(
            f"{folder} is not a clipforge embedding folder ({SIDECAR} missing)"
        ) from None
    except json.JSONDecodeError as e:
        raise EmbeddingFolderError(f"{Path(folder) / SIDECAR} is not valid JSON: {e}") from None
    if side.get("format") != FORMAT or "model" not in side:
        raise EmbeddingFolderError(f"{Path(folder) / SIDECAR} is not a {FORMAT} sidecar")
    return side


def collect_skipped(out: Path) -> list[tuple[str, str]]:
    skipped = []
    for p in sorted((out / "_done").glob("part_*.json")):
        skipped += [tuple(s) for s in json.loads(p.read_text())["skipped"]]
    return skipped
