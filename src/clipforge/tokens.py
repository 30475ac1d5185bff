"""What both tokenizers (CLIP's BPE in `tokenizer`, BERT's WordPiece in `wordpiece`) share: reading a
tokenizers-library JSON file and laying token rows out in a fixed context. Imports neither tokenizer, so each
can import it without a cycle."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; malformed text or another JSON type -> ValueError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def tokenizer_json_type(path: Path) -> str | None:
    """The model type a tokenizers-library file names: "BPE", "WordPiece", ..."""
    model = read_json_object(path).get("model")
    return model.get("type") if isinstance(model, dict) else None


def to_context(
    rows: list[list[int]], texts: Sequence[str], n_ctx: int, pad_id: int, truncate: bool, ends: str
) -> torch.Tensor:
    """Token rows with their start and end tokens -> LongTensor (N, n_ctx): each padded with `pad_id`; too
    long a row cut with its end token kept last, or, with `truncate=False`, refused naming its text."""
    if n_ctx < 2:
        raise ValueError(f"context_length must be at least 2 ({ends}), got {n_ctx}")
    out = []
    for row, (text, ids) in enumerate(zip(texts, rows)):
        if len(ids) > n_ctx:
            if not truncate:
                raise ValueError(
                    f"text {row} is {len(ids)} tokens long with {ends}, more than the context length "
                    f"{n_ctx}: {abbreviate(text)}"
                )
            ids = ids[: n_ctx - 1] + ids[-1:]
        out.append(ids + [pad_id] * (n_ctx - len(ids)))
    return torch.tensor(out, dtype=torch.long).reshape(len(out), n_ctx)  # (N, n_ctx), also for N = 0


def abbreviate(text: str, limit: int = 80) -> str:
    """`text` quoted, cut to `limit` characters for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
