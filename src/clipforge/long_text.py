"""Texts longer than the text tower's context, by one of three strategies chosen per call:

- "truncate" (the default): cut at the context length, the end-of-text token kept last, as CLIP always has.
- "chunk": split the tokens into windows that fill the context, neighbours overlapping by CHUNK_OVERLAP tokens,
  encode each window, average the normalised window embeddings and renormalise. Any model; a text that fits is
  one window, the same as truncate.
- "interpolate": Long-CLIP's positions (Zhang et al. 2024): the first 20 as trained, the rest stretched linearly
  to four times as many (77 -> 248 tokens), texts cut at that length. Runs on any CLIP text transformer of a
  context up to 77; a model fine-tuned at a longer context (`clipforge train --init CKPT --context-length 248`
  stores one) already holds such positions and runs them as trained, reading up to its own context. A BERT-kind
  tower (the default model's MiniLM) learned more positions (512) than the context its tokenizer cuts at (64):
  there is nothing to stretch, and it reads texts up to all its learned positions, as it was pretrained to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from clipforge.model.bert import BertTextTower
from clipforge.model.resize import long_context_length, stretch_positions
from clipforge.model.text import TextTransformer
from clipforge.tokenizer import AnyTokenizer, to_context

LongText = Literal["truncate", "chunk", "interpolate"]
LONG_STRATEGIES: tuple[str, ...] = get_args(LongText)
CHUNK_OVERLAP = 16  # tokens two neighbouring windows share, so that no phrase is seen only cut in two
# The context CLIP models are trained at. A longer one was fine-tuned for long texts (train --context-length):
# interpolate runs such a model with its own positions rather than stretching them again.
CLIP_CONTEXT = 77


class LongTextError(ValueError):
    """An unknown strategy, or one the model cannot run."""


def check_long(long: str) -> None:
    if long not in LONG_STRATEGIES:
        raise LongTextError(f"long={long!r}: expected one of {', '.join(LONG_STRATEGIES)}")


def windows(ids: list[int], size: int, overlap: int = CHUNK_OVERLAP) -> list[list[int]]:
    """Token ids -> windows of at most `size` covering them in order, neighbours sharing `overlap` ids; the
    last window ends at the last id, so the tail is always read whole."""
    if len(ids) <= size:
        return [ids]
    step = max(size - overlap, 1)
    starts = list(range(0, len(ids) - size, step)) + [len(ids) - size]
    return [ids[s : s + size] for s in starts]


def encode_texts(
    model: Any,
    tokenizer: AnyTokenizer,
    texts: Sequence[str],
    long: str,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(N, D) normalised text embeddings of `texts` under the strategy `long`."""
    check_long(long)
    if long == "chunk":
        rows, counts = _windows_of(tokenizer, texts)
        return _pool_windows(_encode_rows(model, tokenizer, rows, batch_size, device), counts)
    n_ctx, encode = None, lambda tokens: model.encode_text(tokens, normalize=True)
    if long == "interpolate":
        tower = _text_tower(model)
        if isinstance(tower, BertTextTower):
            n_ctx = tower.cfg.max_positions
        elif tower.context_length <= CLIP_CONTEXT:
            n_ctx, encode = _interpolated(tower)
    out = [
        encode(tokenizer(list(texts[i : i + batch_size]), context_length=n_ctx).to(device))
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def _windows_of(tokenizer: AnyTokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Every text's windows as token rows with their start and end tokens, and how many windows each has."""
    rows, counts = [], []
    for text in texts:
        ws = windows(tokenizer.encode(text), tokenizer.context_length - 2)  # start and end take two places
        rows += [[tokenizer.sot_token_id, *w, tokenizer.eot_token_id] for w in ws]
        counts.append(len(ws))
    return rows, counts


def _encode_rows(
    model: Any, tokenizer: AnyTokenizer, rows: list[list[int]], batch_size: int, device: torch.device
) -> torch.Tensor:
    n_ctx, pad = tokenizer.context_length, tokenizer.pad_token_id
    out = [
        model.encode_text(
            to_context(
                rows[i : i + batch_size], [""] * len(rows[i : i + batch_size]), n_ctx, pad, True, "ends"
            ).to(device),
            normalize=True,
        )
        for i in range(0, len(rows), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.config.embed_dim)


def _pool_windows(vecs: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(sum(counts), D) window embeddings -> (len(counts), D): each text's mean, renormalised. A text of one
    window keeps that window's vector untouched, so a text that fits matches truncate exactly."""
    out = [v[0] if len(v) == 1 else F.normalize(v.mean(dim=0), dim=-1) for v in vecs.split(counts)]
    return torch.stack(out) if out else vecs


def _text_tower(model: Any) -> TextTransformer | BertTextTower:
    tower = getattr(model, "text", None)
    if not isinstance(tower, (TextTransformer, BertTextTower)):
        raise LongTextError(
            "long='interpolate' reads the position embeddings of the text tower, which this model "
            f"({type(tower or model).__name__}) does not run in PyTorch: use long='chunk'"
        )
    return tower


def _interpolated(tower: TextTransformer) -> tuple[int, Callable[[torch.Tensor], torch.Tensor]]:
    """The stretched context length, and a function from tokens of up to that length to normalised vectors."""
    n_ctx = long_context_length(tower.context_length)
    positions = stretch_positions(tower.positional_embedding, n_ctx)  # (n_ctx, width)
    return n_ctx, lambda tokens: F.normalize(tower(tokens, positions=positions), dim=-1)
