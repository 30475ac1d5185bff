"""Texts past the context length: truncate, chunk and interpolate (clipforge.long_text), per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clipforge
from clipforge.encoder import Encoder
from clipforge.long_text import LongTextError, windows
from clipforge.model import create_model, get_config
from clipforge.model.config import BertTextConfig, CLIPConfig, PreprocessConfig, VisionConfig
from clipforge.model.resize import ResizeError, long_context_length, stretch_positions, with_context_length
from clipforge.wordpiece import train_wordpiece

WORDS = "red green blue cat dog car tree house boat table street beach small large".split()


@pytest.fixture(scope="module")
def enc():
    captions = [f"a {a} {b} on a {c}" for a in WORDS for b in WORDS for c in WORDS[:3]]
    tok = clipforge.train_tokenizer(captions, vocab_size=600, context_length=32)
    cfg = get_config("tiny").replace(
        embed_dim=32,
        vision={"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "heads": 2},
        text={
            "vocab_size": tok.vocab_size,
            "sot_token_id": tok.sot_token_id,
            "eot_token_id": tok.eot_token_id,
            "width": 64,
            "heads": 2,
            "layers": 2,
            "context_length": 32,
        },
    )
    return Encoder(create_model(cfg, seed=0), clipforge.Preprocess(cfg.preprocess), tok)


def long_caption(tail: str) -> str:
    return " ".join(WORDS * 3) + " " + tail  # 42 words before the tail: past the 32-token context


def test_chunk_of_a_text_that_fits_equals_truncate(enc):
    texts = ["a red cat on a table", "boat", " ".join(WORDS)]
    assert all(len(enc.tokenizer.encode(t)) <= 30 for t in texts)
    assert np.array_equal(enc.embed_texts(texts, long="chunk"), enc.embed_texts(texts))


def test_chunk_reads_the_tail_that_truncate_cuts(enc):
    a, b = long_caption("a red boat on the beach"), long_caption("a small green tree in a house")
    truncated = enc.embed_texts([a, b])
    chunked = enc.embed_texts([a, b], long="chunk")
    assert np.array_equal(truncated[0], truncated[1])  # the tails differ past the context: truncate is blind
    assert not np.allclose(chunked[0], chunked[1], atol=1e-4)  # chunk sees them
    assert not np.allclose(chunked[0], truncated[0], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(chunked, axis=1), 1, atol=1e-6)


def test_windows_cover_the_text_with_overlap_and_end_at_its_end():
    ids = list(range(100))
    ws = windows(ids, 30, overlap=8)
    assert all(len(w) == 30 for w in ws) and ws[0][0] == 0 and ws[-1][-1] == 99
    assert set(i for w in ws for i in w) == set(ids)
    assert all(len(set(p) & set(n)) >= 8 for p, n in zip(ws, ws[1:]))
    assert windows(ids[:30], 30) == [ids[:30]]


def long_clip_reference(pos: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's own construction (its train script), written out position by position: 77 -> 248."""
    n, dim = pos.shape
    new = torch.zeros(4 * n - 3 * keep, dim)
    new[:keep] = pos[:keep]
    for i in range(n - 1 - keep):
        for j in range(4):
            new[4 * i + j + keep] = pos[i + keep] * (4 - j) / 4 + pos[i + 1 + keep] * j / 4
    for j in range(4):  # the last four extrapolate the last step
        new[4 * n - 3 * keep - 4 + j] = pos[n - 1] + (pos[n - 1] - pos[n - 2]) * j / 4
    return new


def test_interpolation_keeps_the_first_positions_and_follows_long_clip():
    pos = torch.randn(77, 16, generator=torch.Generator().manual_seed(0))
    stretched = stretch_positions(pos, long_context_length(77))
    assert stretched.shape == (248, 16)
    assert torch.equal(stretched[:20], pos[:20])
    torch.testing.assert_close(stretched, long_clip_reference(pos), atol=1e-6, rtol=1e-6)


def test_interpolate_leaves_short_texts_alone_and_reads_long_ones(enc):
    short = ["a red cat", "boat on a beach"]  # under 20 tokens: only unstretched positions
    np.testing.assert_array_equal(enc.embed_texts(short, long="interpolate"), enc.embed_texts(short))
    a, b = long_caption("a red boat on the beach"), long_caption("a small green tree in a house")
    got = enc.embed_texts([a, b], long="interpolate")
    assert not np.allclose(got[0], got[1], atol=1e-4)


def test_interpolate_runs_a_long_context_model_with_its_own_positions(enc):
    # A model fine-tuned at a longer context than CLIP's 77 (train --context-length) is not stretched again.
    cfg = enc.model.config.replace(text={"context_length": 100})
    tok = clipforge.Tokenizer(enc.tokenizer.vocab, enc.tokenizer.merges, context_length=100)
    long_enc = Encoder(create_model(cfg, seed=1), enc.preprocess, tok)
    text = long_caption("a red boat on the beach") + " " + long_caption("tree")  # past 32, within 100
    assert 32 < len(tok.encode(text)) + 2 <= 100
    np.testing.assert_array_equal(
        long_enc.embed_texts([text], long="interpolate"), long_enc.embed_texts([text])
    )


def test_unknown_strategy_is_named(enc):
    with pytest.raises(LongTextError, match="long='summarise'.*truncate, chunk, interpolate"):
        enc.embed_texts(["a cat"], long="summarise")
    with pytest.raises(LongTextError, match="long='x'"):
        Encoder(enc.model, enc.preprocess, enc.tokenizer, long="x")


def test_cli_embed_text_takes_long(enc, tmp_path, capsys):
    import json

    from clipforge.checkpoint import save_model
    from clipforge.cli import main

    save_model(enc.model, tmp_path / "m", tokenizer=enc.tokenizer)
    text = long_caption("a red boat on the beach")
    for long in ("truncate", "chunk", "interpolate"):
        assert main(["embed-text", text, "--model", str(tmp_path / "m"), "--long", long, "--json"]) == 0
        got = np.array(json.loads(capsys.readouterr().out)["items"][0]["embedding"])
        np.testing.assert_allclose(got, enc.embed_texts([text], long=long)[0], atol=1e-6)


# --- a BERT-kind text tower (the default model's MiniLM): 512 learned positions, a context of 64 -------------


@pytest.fixture(scope="module")
def bert_enc():
    """A tiny CLIP whose BERT tower learned 48 positions but whose tokenizer cuts at 16, as MiniLM (512, 64)."""
    tok = train_wordpiece([f"a {a} {b} on a {c}" for a in WORDS for b in WORDS for c in WORDS[:3]], 200, 16)
    text = BertTextConfig(
        context_length=16, vocab_size=tok.vocab_size, width=32, heads=4, layers=2, max_positions=48,
        pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
    )  # fmt: skip
    vision = VisionConfig(image_size=32, width=32, layers=1, heads=2, patch_size=16)
    cfg = CLIPConfig(embed_dim=16, vision=vision, text=text, preprocess=PreprocessConfig(32))
    return Encoder(create_model(cfg, seed=0), clipforge.Preprocess(cfg.preprocess), tok)


def all_positions(enc: Encoder, texts: list[str]) -> np.ndarray:
    """The tower run directly on tokens cut at the end of its position table (48), not at its context (16)."""
    tokens = enc.tokenizer(texts, context_length=enc.model.config.text.max_positions)
    return enc.model.encode_text(tokens, normalize=True).detach().numpy()


def test_bert_interpolate_reads_every_learned_position(bert_enc):
    a = " ".join(WORDS) + " red boat on the beach"  # 19 words: past the 16-token context, within 48
    b = " ".join(WORDS) + " green tree in a house"
    assert 16 < len(bert_enc.tokenizer.encode(a)) + 2 <= 48
    truncated = bert_enc.embed_texts([a, b])
    assert np.array_equal(truncated[0], truncated[1])  # the tails are cut
    got = bert_enc.embed_texts([a, b], long="interpolate")
    assert not np.allclose(got[0], got[1], atol=1e-4)
    # Nothing is stretched: the same as the same weights reading at a context of all 48 positions.
    np.testing.assert_allclose(got, all_positions(bert_enc, [a, b]), atol=1e-6)
    short = ["a red cat", "boat on a beach"]
    np.testing.assert_array_equal(
        bert_enc.embed_texts(short, long="interpolate"), bert_enc.embed_texts(short)
    )


def test_bert_interpolate_cuts_at_the_last_learned_position(bert_enc):
    text = " ".join(WORDS * 5)  # 70 words, past the 48 positions
    np.testing.assert_allclose(
        bert_enc.embed_texts([text], long="interpolate"), all_positions(bert_enc, [text]), atol=1e-6
    )
    tokens = torch.full((1, 49), bert_enc.tokenizer.cls_token_id)
    with pytest.raises(ValueError, match="49 tokens; this model has 48 positions"):
        bert_enc.model.encode_text(tokens)


def test_bert_chunk_reads_the_tail_and_leaves_short_texts_alone(bert_enc):
    short = ["a red cat on a table", "boat"]
    assert np.array_equal(bert_enc.embed_texts(short, long="chunk"), bert_enc.embed_texts(short))
    a, b = " ".join(WORDS * 2) + " red boat", " ".join(WORDS * 2) + " green tree"
    chunked = bert_enc.embed_texts([a, b], long="chunk")
    assert not np.allclose(chunked[0], chunked[1], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(chunked, axis=1), 1, atol=1e-6)


def test_bert_context_length_changes_within_its_learned_positions(bert_enc):
    cfg, sd = bert_enc.model.config, bert_enc.model.state_dict()
    new, same = with_context_length(cfg, sd, 40)
    assert new.text.context_length == 40 and same is sd  # no position is stretched
    with pytest.raises(ResizeError, match="learned 48 positions"):
        with_context_length(cfg, sd, 49)
