"""The tokenizer of a run: trained on the training captions for a run from scratch, else reused.

Reading captions for the vocabulary needs only the text, not the images: a light pass over the same sources
the loader reads (manifests, folders of images with caption sidecars, `.tar` shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clipforge.data.sources import iter_samples
from clipforge.tokenizer import Tokenizer, train_tokenizer


def _skip(e: Exception) -> None:
    """A corrupt shard record is the loader's to count and report; the vocabulary just goes on."""


def read_captions(sources: Sequence[str | Path], limit: int = 200_000) -> list[str]:
    """Up to `limit` captions from the training sources, in order, read by the reader the loader reads
    through (clipforge.data.sources); local shards are indexed without reading their images."""
    out: list[str] = []
    for s in iter_samples(list(sources), on_error=_skip):
        for c in s.captions:
            out.append(c)
            if len(out) >= limit:
                return out
    return out


def build_tokenizer(captions: Sequence[str], vocab_size: int, context_length: int) -> Tokenizer:
    if not captions:
        raise ValueError("no captions found in the training data to train a vocabulary on")
    return train_tokenizer(captions, vocab_size=vocab_size, context_length=context_length)
