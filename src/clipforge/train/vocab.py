"""The tokenizer of a run: trained on the training captions for a run from scratch, else reused.

Reading captions for the vocabulary needs only the text, not the images, so it is a light pass over the
sources: JSONL / CSV / TSV manifests, folders of `.txt` captions, and `.tar` shards (their `.txt` members).
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from clipforge.tokenizer import Tokenizer, train_tokenizer

CAPTION_KEYS = ("captions", "caption", "text")


def _from_record(rec: dict, source: str) -> list[str]:
    for key in CAPTION_KEYS:
        v = rec.get(key)
        if v:
            return [v] if isinstance(v, str) else [str(c) for c in v]
    return []


def _jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    yield from _from_record(json.loads(line), str(path))
                except json.JSONDecodeError:
                    continue  # the loader reports bad lines; the vocabulary just skips them


def _table(path: Path) -> Iterator[str]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter=delimiter):
            for c in _from_record(row, str(path)):
                yield from (p for p in c.split("|") if p.strip())


def _tar(path: Path) -> Iterator[str]:
    with tarfile.open(path) as t:
        for m in t:
            if m.isfile() and m.name.endswith(".txt"):
                yield t.extractfile(m).read().decode("utf-8", errors="replace").strip()


def read_captions(sources: Sequence[str | Path], limit: int = 200_000) -> list[str]:
    """Up to `limit` captions from the training sources, in order."""
    out: list[str] = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"training data not found: {p}")
        if p.is_dir():
            it: Iterator[str] = (f.read_text(encoding="utf-8").strip() for f in sorted(p.rglob("*.txt")))
        elif p.suffix == ".jsonl":
            it = _jsonl(p)
        elif p.suffix in (".csv", ".tsv"):
            it = _table(p)
        elif p.suffix == ".tar":
            it = _tar(p)
        else:
            raise ValueError(f"{p}: unknown data format (expected .jsonl, .csv, .tsv, .tar or a folder)")
        for c in it:
            if c:
                out.append(c)
                if len(out) >= limit:
                    return out
    return out


def build_tokenizer(captions: Sequence[str], vocab_size: int, context_length: int) -> Tokenizer:
    if not captions:
        raise ValueError("no captions found in the training data to train a vocabulary on")
    return train_tokenizer(captions, vocab_size=vocab_size, context_length=context_length)
