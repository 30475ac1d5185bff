"""CLIP tokenizer: parity with an independent reference of OpenAI's algorithm and with Hugging Face."""

from __future__ import annotations

import gzip
import html
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch
from conftest import require

from clipforge.tokenizer import (
    OPENAI_NUM_MERGES,
    Tokenizer,
    byte_symbols,
    clean_text,
    get_tokenizer,
    train_tokenizer,
)

VOCAB_SIZE = 1500

TEST_TEXTS = [
    "a photo of a cat",
    "A Photo Of A CAT sitting on the mat.",
    "café au lait, naïve résumé",
    "thumbs up 👍🏽 and a cat 🐱",
    "donâ€™t stop",  # mojibake of "don’t": ftfy repairs it
    "it’s a curly apostrophe",  # ftfy straightens the quote
    "東京 and 한국어 text",
    "!!!???... what?!",
    "42 apples and 3.14 pies",
    "it's we'll they're I'd you've I'M",
    "fish &amp; chips &lt;3 &amp;amp;",
    "  extra   spaces\tand\ttabs\nand\n\nnewlines  ",
    "",
    "<|endoftext|> inside <|startoftext|> text",
    "ｆｕｌｌ-width letters",
    "x" * 300,
    " ".join(["a long caption with many words"] * 30),
]


def _captions(n: int, seed: int = 0) -> list[str]:
    """A small varied caption corpus: templates over real and made-up words, accents, digits, CJK, emoji."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ren", "tas", "vo", "qui", "zel", "dor", "fin", "ash", "pe", "gru", "wy"]
    made_up = ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(300)]
    subjects = [
        "cat",
        "dog",
        "bird",
        "car",
        "woman",
        "man",
        "child",
        "house",
        "tree",
        "boat",
        "café",
        "horse",
    ]
    adjectives = ["red", "small", "happy", "old", "shiny", "naïve", "blue", "wooden", "fluffy", "dark"]
    places = ["in the park", "on a beach", "near the river", "at night", "in Tokyo 東京", "in Seoul 한국"]
    extras = ["", "!", "...", " 👍", " 🐱", ", photo", " (2019)", " #42", " it's great", " we'll see"]
    out = []
    for _ in range(n):
        words = " ".join(rng.choices(made_up, k=rng.randint(2, 6)))
        text = f"{rng.choice(['A', 'a', 'The', 'two'])} {rng.choice(adjectives)} {rng.choice(subjects)}"
        out.append(f"{text} {words} {rng.choice(places)}{rng.choice(extras)} x{rng.randint(1, 99)}")
    return out


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(_captions(400), vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def saved_dir(trained: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("clip_tok")
    trained.save(directory)
    return directory


# --- an independent reference: OpenAI's simple_tokenizer algorithm, written plainly -------------------


def _reference_byte_table() -> dict[int, str]:
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


_REF_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _reference_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _reference_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    table = _reference_byte_table()
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    ids = []
    for word in _REF_SPLIT.findall(text):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[word])
            continue
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        ids.extend(vocab[s] for s in _reference_bpe(symbols, ranks))
    return ids


def _reference_row(text: str, tok: Tokenizer, n_ctx: int = 77) -> list[int]:
    ids = [tok.sot_token_id, *_reference_encode(text, tok.vocab, tok.merges), tok.eot_token_id]
    if len(ids) > n_ctx:
        ids = ids[: n_ctx - 1] + [tok.eot_token_id]
    return ids + [0] * (n_ctx - len(ids))


# --- tests ----------------------------------------------------------------------------------------------


def test_vocabulary_layout(trained: Tokenizer) -> None:
    assert trained.vocab["!"] == 0 and trained.vocab["a"] == 64 and trained.vocab["a</w>"] == 320
    assert trained.vocab["Ġ"] == 220  # byte 0x20 (space), as in OpenAI's vocabulary
    assert trained.eot_token_id == trained.vocab_size - 1 == trained.sot_token_id + 1
    assert 1000 < trained.vocab_size <= VOCAB_SIZE
    assert [trained.vocab[a + b] for a, b in trained.merges[:3]] == [512, 513, 514]


def test_parity_with_reference_algorithm(trained: Tokenizer) -> None:
    expected = torch.tensor([_reference_row(t, trained) for t in TEST_TEXTS])
    got = trained(TEST_TEXTS)
    assert got.dtype == torch.long and got.shape == (len(TEST_TEXTS), 77)
    assert torch.equal(got, expected)
    # The reference's BPE really merges: the corpus words become single tokens.
    words = "a red cat in the park".split()
    assert trained.encode(" ".join(words)) == [trained.vocab[w + "</w>"] for w in words]


def test_normalisation_cases(trained: Tokenizer) -> None:
    assert clean_text("donâ€™t") == "don't"
    assert clean_text("fish &amp;amp; chips") == "fish & chips"
    assert clean_text("  A\tB\n\nc  ") == "a b c"
    assert trained.encode("donâ€™t") == trained.encode("don't")


def test_parity_with_hugging_face(trained: Tokenizer, saved_dir: Path) -> None:
    transformers = require("transformers")
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        hf = cls.from_pretrained(saved_dir)
        assert hf.bos_token_id == trained.sot_token_id and hf.eos_token_id == trained.eot_token_id
        assert hf.model_max_length == 77
        for text in TEST_TEXTS:
            ours = trained(text)[0]
            ours = ours[
                : int((ours == trained.eot_token_id).nonzero()[-1]) + 1
            ].tolist()  # up to the last eot
            # transformers 5 has no ftfy tokenizer: its CLIPTokenizer (= CLIPTokenizerFast) only does NFC,
            # whitespace and lower case, so it gets our cleaned text; the split and BPE must agree exactly.
            theirs = hf(clean_text(text), truncation=True, max_length=77)["input_ids"]
            assert theirs == ours, text
            if clean_text(text) == " ".join(text.split()).lower():  # no ftfy/HTML change: raw text agrees
                assert hf(text, truncation=True, max_length=77)["input_ids"] == ours, text


def test_truncation_keeps_eot(trained: Tokenizer) -> None:
    row = trained("x " * 200)[0]
    assert row[0] == trained.sot_token_id and row[-1] == trained.eot_token_id
    assert trained("x " * 200, context_length=16).shape == (1, 16)
    assert trained("", context_length=5).tolist() == [[trained.sot_token_id, trained.eot_token_id, 0, 0, 0]]


def test_truncate_false_names_the_text(trained: Tokenizer) -> None:
    long_text = "an unusually long caption " * 30
    with pytest.raises(ValueError, match="unusually long caption"):
        trained(["short", long_text], truncate=False)
    assert trained(["short"], truncate=False).shape == (1, 77)


def test_batch_shape_and_dtype(trained: Tokenizer) -> None:
    batch = trained(["a cat", "a dog", ""], context_length=32)
    assert batch.shape == (3, 32) and batch.dtype == torch.long
    assert torch.equal(batch[0], trained("a cat", context_length=32)[0])


def test_decode_round_trip(trained: Tokenizer) -> None:
    # Every pre-token ends a word, so digits and punctuation come back spaced, as in OpenAI's decode.
    assert trained.decode(trained("42 apples, 3.14!")[0]) == "4 2 apples , 3 . 1 4 !"
    assert trained.decode(trained("a photo of a dog")[0]) == "a photo of a dog"
    assert trained.decode(trained.encode("café 東京 👍🏽")) == "café 東京 👍🏽"
    # Id 0 is "!" (also the padding id): it is kept where no eot marks the end of the text.
    assert trained.encode("hi!?")[-2] == 0 and trained.decode(trained.encode("hi!?")) == "hi !?"


def test_save_load_round_trip(trained: Tokenizer, saved_dir: Path) -> None:
    assert {p.name for p in saved_dir.iterdir()} >= {
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert (saved_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    loaded = get_tokenizer(saved_dir)
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert torch.equal(loaded(TEST_TEXTS), trained(TEST_TEXTS))


def test_tokenizer_json_alone(trained: Tokenizer, saved_dir: Path, tmp_path: Path) -> None:
    transformers = require("transformers")
    transformers.CLIPTokenizer.from_pretrained(saved_dir).save_pretrained(tmp_path / "hf")
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_bytes((tmp_path / "hf" / "tokenizer.json").read_bytes())
    assert torch.equal(Tokenizer.from_pretrained(only_json)(TEST_TEXTS), trained(TEST_TEXTS))


def _write_openai_gz(path: Path, merges: list[tuple[str, str]]) -> None:
    lines = ['"bpe_simple_vocab_16e6.txt#version: 0.2'] + [f"{a} {b}" for a, b in merges]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode("utf-8")))


def test_openai_gz_matches_hf_directory(trained: Tokenizer, saved_dir: Path, tmp_path: Path) -> None:
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    _write_openai_gz(gz, trained.merges)
    from_gz, from_dir = Tokenizer.from_pretrained(gz), Tokenizer.from_pretrained(saved_dir)
    assert from_gz.vocab == from_dir.vocab
    assert torch.equal(from_gz(TEST_TEXTS), from_dir(TEST_TEXTS))


def test_openai_gz_full_size_ids(tmp_path: Path) -> None:
    # 65536 two-byte merges, more than OpenAI keeps: loading caps them, so sot/eot land on 49406/49407.
    bare = byte_symbols()[:256]
    merges = [(a, b) for a in bare for b in bare]
    gz = tmp_path / "big.txt.gz"
    _write_openai_gz(gz, merges)
    tok = Tokenizer.from_pretrained(gz)
    assert len(tok.merges) == OPENAI_NUM_MERGES
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (49406, 49407, 49408)


def test_unseen_characters_are_not_dropped() -> None:
    tok = train_tokenizer(["abc def ghi", "the quick brown fox"] * 20, vocab_size=600)
    ids = tok.encode("42")
    assert [tok.decode([i]) for i in ids] == ["4", "2"]
    assert tok.encode("€") == [tok.vocab[s] for s in ("â", "Ĥ", "¬</w>")]  # three UTF-8 bytes


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="neither vocab.json"):
        get_tokenizer(tmp_path)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.txt.gz"):
        get_tokenizer(bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text("{not json", encoding="utf-8")
    (broken / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json"):
        get_tokenizer(broken)
    (broken / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="lacks"):
        get_tokenizer(broken)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a"], vocab_size=100)


def test_malformed_merges_name_file_and_line(saved_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "vocab.json").write_bytes((saved_dir / "vocab.json").read_bytes())
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nc d e\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt: line 3 "):
        get_tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nzz qq\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        get_tokenizer(tmp_path)


def test_training_is_reproducible_across_processes(tmp_path):
    """Two processes (different hash seeds) learn the same merges from the same captions."""
    import json
    import os
    import subprocess
    import sys

    import clipforge as cf

    script = (
        "import json, sys; from clipforge.tokenizer import train_tokenizer; "
        "caps = [f'{c} {o} number {i % 7}' for i in range(300) for c, o in [('red', 'cat'), ('blue', 'car'), ('tall', 'tree')]]; "
        "print(json.dumps(train_tokenizer(caps, 700).merges))"
    )
    src = str(Path(cf.__file__).parents[1])
    outs = [
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert outs[0] == outs[1] and len(json.loads(outs[0])) > 10
