"""The tokenizer of a run: trained on the training captions for a run from scratch, else reused.

Reading captions for the vocabulary needs only the text, not the images: a light pass over the same sources
the loader reads (manifests, folders of images with `.txt` captions, `.tar` shards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from clipforge.data import shards as sh
from clipforge.data.loader import open_source
from clipforge.data.manifest import SampleError
from clipforge.tokenizer import Tokenizer, train_tokenizer


def _shard_captions(urls: Sequence[str]) -> Iterator[str]:
    def skip(e: Exception) -> bool:
        return True  # a corrupt member is the loader's to count and report; the vocabulary just skips it

    for rec in sh.iter_records(urls, skip):
        try:
            yield from sh.parse_record(rec)[2]
        except SampleError:
            continue


def read_captions(sources: Sequence[str | Path], limit: int = 200_000) -> list[str]:
    """Up to `limit` captions from the training sources, in order, read exactly as the loader reads them
    (clipforge.data.loader.open_source: manifests, caption folders, shards)."""
    kind, items = open_source(list(sources))
    it: Iterator[str] = (
        (c for s in items for c in s.captions) if kind == "manifest" else _shard_captions(items)
    )
    out: list[str] = []
    for c in it:
        if c:
            out.append(c)
            if len(out) >= limit:
                break
    return out


def build_tokenizer(captions: Sequence[str], vocab_size: int, context_length: int) -> Tokenizer:
    if not captions:
        raise ValueError("no captions found in the training data to train a vocabulary on")
    return train_tokenizer(captions, vocab_size=vocab_size, context_length=context_length)
