"""Micro-batcher, length-bucketed text encoding and overlapped image decoding give the unbatched results."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.batching import (
    MicroBatcher,
    encode_images_overlapped,
    encode_texts_bucketed,
    prefetch_batches,
    text_lengths,
)
from clipforge.transforms import Preprocess


@pytest.fixture(scope="module")
def model():
    return clipforge.create_model("tiny", seed=0).eval()


def _tokens(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(len(lengths), model.config.text.context_length, dtype=torch.long)
    for i, n in enumerate(lengths):
        t[i, : n - 1] = torch.randint(1, 500, (n - 1,), generator=g)
        t[i, n - 1] = model.config.text.eot_token_id
    return t


def test_text_lengths(model):
    t = _tokens(model, [3, 7, 2])
    assert text_lengths(t, model.config.text.eot_token_id).tolist() == [3, 7, 2]


def test_bucketed_text_encoding_matches_unbatched(model):
    lengths = [2, 30, 5, 17, 4, 9, 31, 3, 12, 6]
    tokens = _tokens(model, lengths)
    with torch.no_grad():
        ref = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(len(lengths))])
    out = encode_texts_bucketed(model, tokens, batch_size=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_micro_batcher_groups_concurrent_requests_and_keeps_results(model):
    tokens = _tokens(model, [4, 9, 2, 15, 6, 3, 11, 8])
    with torch.no_grad():
        ref = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(len(tokens))])

    def fn(items):
        with torch.no_grad():
            return list(model.encode_text(torch.stack(items)))

    results = [None] * len(tokens)
    start = threading.Barrier(len(tokens))
    with MicroBatcher(fn, max_batch_size=4, max_wait_ms=200) as mb:

        def client(i):
            start.wait()
            results[i] = mb(tokens[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(tokens))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    torch.testing.assert_close(torch.stack(results), ref, atol=1e-5, rtol=1e-5)
    assert mb.batch_sizes.items == len(tokens)
    assert mb.batch_sizes.largest == 4 and len(mb.batch_sizes) < len(tokens)  # it did batch, and capped


def test_micro_batcher_asyncio_and_errors():
    with MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=8, max_wait_ms=50) as mb:

        async def run():
            return await asyncio.gather(*(mb.acall(i) for i in range(5)))

        assert asyncio.run(run()) == [0, 2, 4, 6, 8]
        assert mb.batch_sizes.counts == [0, 0, 0, 0, 0, 1, 0, 0, 0] and len(mb.batch_sizes) == 1

    def bad(xs):
        raise KeyError("boom")

    with MicroBatcher(bad, max_wait_ms=0) as mb:
        with pytest.raises(KeyError):
            mb(1)
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(bad, max_batch_size=0)


def test_micro_batcher_statistics_stay_bounded_in_a_long_running_server():
    # A server runs for months: its batch statistics must not grow with the number of requests.
    with MicroBatcher(lambda xs: xs, max_batch_size=4, max_wait_ms=0) as mb:
        for i in range(2000):
            assert mb(i) == i
        assert len(mb.batch_sizes.counts) == 5  # one counter per possible batch size, whatever the traffic
        assert len(mb.batch_sizes) == mb.batch_sizes.counts[1] == mb.batch_sizes.items == 2000


def test_overlapped_image_encoding_matches_sequential(model, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    pre = Preprocess(model.config.preprocess)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([pre(p) for p in paths]))
    assert [b.shape[0] for b in prefetch_batches(paths, pre, batch_size=2)] == [2, 2, 1]
    out = encode_images_overlapped(model, paths, pre, batch_size=2, workers=2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
