"""The multilingual text tower: parallel phrases split as the corpus splits concepts, a WordPiece vocabulary for
every script that names the characters it cannot represent, and a student distilled from a tiny random teacher
(a few steps, on a fake emojibase folder written here) assembled into a checkpoint `clipforge.load` reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.data import parallel
from clipforge.data.corpus import CorpusItem, split_by_concept
from clipforge.model.config import BertTextConfig, CLIPConfig, PreprocessConfig, VisionConfig
from clipforge.multilingual import (
    STUDENT_DIR,
    DistillConfig,
    MultilingualError,
    assemble_dir,
    distill_data,
    load_student,
    new_student,
    student_from_teacher,
    train_multilingual,
    train_student,
)
from clipforge.wordpiece import WordPieceTokenizer, extend_wordpiece, train_wordpiece

# (hexcode, English label and tags, then French, Japanese and Thai)
EMOJIS = [
    (
        "1F34E",
        "red apple",
        ["apple", "fruit"],
        "pomme rouge",
        ["pomme", "fruit"],
        "赤リンゴ",
        ["りんご"],
        "แอปเปิ้ลแดง",
        ["ผลไม้"],
    ),
    (
        "1F34F",
        "green apple",
        ["apple", "green"],
        "pomme verte",
        ["pomme", "vert"],
        "青リンゴ",
        ["りんご"],
        "แอปเปิ้ลเขียว",
        ["ผลไม้"],
    ),
    ("1F436", "dog face", ["dog", "pet"], "tête de chien", ["chien"], "犬の顔", ["犬"], "หน้าสุนัข", ["สุนัข"]),
    ("1F431", "cat face", ["cat", "pet"], "tête de chat", ["chat"], "猫の顔", ["猫"], "หน้าแมว", ["แมว"]),
    ("1F34C", "banana", ["fruit"], "banane", ["fruit"], "バナナ", ["果物"], "กล้วย", ["ผลไม้"]),
    (
        "2764-FE0F",
        "red heart",
        ["heart", "love"],
        "cœur rouge",
        ["amour"],
        "赤いハート",
        ["愛"],
        "หัวใจสีแดง",
        ["รัก"],
    ),
    ("2600-FE0F", "sun", ["sunny", "bright"], "soleil", ["beau"], "太陽", ["晴れ"], "พระอาทิตย์", ["แดด"]),
    (
        "26C4",
        "snowman without snow",
        ["snowman"],
        "bonhomme de neige",
        ["neige"],
        "雪だるま",
        ["雪"],
        "ตุ๊กตาหิมะ",
        ["หิมะ"],
    ),
    ("1F680", "rocket", ["space"], "fusée", ["espace"], "ロケット", ["宇宙"], "จรวด", ["อวกาศ"]),
    ("1F355", "pizza", ["cheese", "slice"], "pizza", ["fromage"], "ピザ", ["チーズ"], "พิซซ่า", ["ชีส"]),
    (
        "1F1EB-1F1F7",
        "flag: France",
        ["FR"],
        "drapeau : France",
        ["drapeau"],
        "旗: フランス",
        ["旗"],
        "ธง: ฝรั่งเศส",
        ["ธง"],
    ),
]
LOCALES = {"en": 1, "fr": 3, "ja": 5, "th": 7}
FRACTION, SEED = 0.4, 0
CAPTIONS = ["a red apple", "a drawing of a dog", "a cat on a table", "pizza with cheese", "a rocket in space"]


def write_corpus(root: Path) -> Path:
    """A corpus folder with its corpus.json, a train.jsonl and an emojibase-data package of four locales."""
    pkg = root / "downloads" / "npm" / "emojibase-data-17.0.0" / "package"
    for locale, col in LOCALES.items():
        (pkg / locale).mkdir(parents=True)
        data = [{"hexcode": e[0], "label": e[col], "tags": e[col + 1]} for e in EMOJIS]
        (pkg / locale / "data.json").write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    (root / "corpus.json").write_text(json.dumps({"config": {"heldout_fraction": FRACTION, "seed": SEED}}))
    rows = [{"image": f"images/x/{i}.png", "captions": [c], "concept": c} for i, c in enumerate(CAPTIONS)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_teacher(path: Path, seed: int = 0) -> Path:
    """A random CLIP with a two-layer BERT text tower and a WordPiece vocabulary of the English side."""
    english = CAPTIONS + [f"{e[1]}: {', '.join(e[2])}" for e in EMOJIS] + ["flag of France"]
    tok = train_wordpiece(english, 300, context_length=24)
    text = BertTextConfig(
        context_length=24,
        vocab_size=tok.vocab_size,
        width=32,
        heads=4,
        layers=2,
        max_positions=24,
        pad_token_id=tok.pad_token_id,
        cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id,
    )
    vision = VisionConfig(image_size=32, width=32, layers=1, heads=2, patch_size=16)
    cfg = CLIPConfig(
        embed_dim=16, vision=vision, text=text, activation="gelu", preprocess=PreprocessConfig(32)
    )
    return clipforge.save_model(clipforge.create_model(cfg, seed=seed), path, tokenizer=tok)


TINY = DistillConfig(
    layers=1, context_length=24, vocab_size=400, batch_size=8, steps=3, english_captions=10, from_teacher=True
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus) -> tuple[Path, Path]:
    """(teacher dir, multilingual model dir) of one tiny distillation."""
    tmp = tmp_path_factory.mktemp("multilingual")
    teacher = write_teacher(tmp / "teacher")
    out = train_multilingual(teacher, tmp / "out", corpus, TINY, cache=tmp / "features")
    return teacher, out


def held_out_concepts() -> set[str]:
    """The concepts the corpus builder itself holds out, from its own split of items named like the emojis."""
    items = [
        CorpusItem("noto", e[0], clipforge.data.captions.emoji_name(e[1]), [], "png", "") for e in EMOJIS
    ]
    return {it.concept for it in split_by_concept(items, FRACTION, SEED)[1]}


def test_phrases_split_by_the_corpus_concepts_in_every_language(corpus):
    pkg = parallel.emojibase_package(corpus)
    assert parallel.locales(pkg) == sorted(LOCALES)
    train, heldout = parallel.split_phrases(parallel.emoji_phrases(pkg), *parallel.corpus_split(corpus))
    expected = held_out_concepts()
    assert expected and len(expected) < len(EMOJIS)  # both sides are exercised
    for locale in LOCALES:
        assert {p.concept for p in heldout if p.locale == locale} == expected
        assert not {p.concept for p in train if p.locale == locale} & expected
    # The concept is the English name as the corpus captions it, whatever the phrase's language.
    flag = [p for p in train + heldout if p.locale == "th" and p.kind == "label" and "ธง" in p.text]
    assert flag[0].concept == "flag of France" and flag[0].english == "flag of France"


def test_student_never_reads_a_held_out_phrase(corpus):
    data = distill_data(corpus, TINY)
    pkg = parallel.emojibase_package(corpus)
    _, heldout = parallel.split_phrases(parallel.emoji_phrases(pkg), FRACTION, SEED)
    assert heldout and not {p.text for p in heldout} & set(data.texts)
    assert not {p.english for p in heldout} & set(data.english)


def test_vocabulary_names_the_characters_it_cannot_represent():
    tok = train_wordpiece(["pomme rouge", "赤リンゴ", "แอปเปิ้ล"], 100)
    assert tok.unknown_characters("rouge Ω 猫 pomme") == ["Ω", "猫"]
    assert tok.unknown_characters("POMME") == []  # lower-cased as the vocabulary was
    ids = tok("rouge Ω pomme")[0].tolist()
    unk = tok._backend.token_to_id("[UNK]")
    assert ids.count(unk) == 1
    # A character seen only inside words still starts one, and one seen only first still continues one.
    assert unk not in tok("emmop ruoge")[0].tolist()
    # Scripts without spaces and combining vowel signs survive (no accent stripping).
    assert tok.decode(tok("แอปเปิ้ล")[0]).replace(" ", "") == "แอปเปิ้ล"


def test_assembled_model_loads_and_embeds_other_scripts(built):
    teacher_dir, out = built
    model, _, tok = clipforge.load(out)
    assert isinstance(tok, WordPieceTokenizer) and model.config.text.layers == TINY.layers
    trained = [e for e in EMOJIS if clipforge.data.captions.emoji_name(e[1]) not in held_out_concepts()]
    queries = [trained[0][LOCALES["ja"]], trained[0][LOCALES["th"]], trained[0][LOCALES["fr"]], "red apple"]
    assert all(tok.unknown_characters(q) == [] for q in queries)
    tokens = tok(queries)
    unk = tok._backend.token_to_id("[UNK]")
    assert tokens.max() < model.config.text.vocab_size and not (tokens == unk).any()
    with torch.no_grad():
        emb = model.encode_text(tokens, normalize=True)
    assert emb.shape == (4, 16) and torch.isfinite(emb).all()
    # The assembled projection is the student's map into the teacher's pooled space, then the teacher's.
    teacher, _, _ = clipforge.load(teacher_dir)
    student = load_student(out / STUDENT_DIR)
    last = json.loads((out / STUDENT_DIR / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == TINY.steps and last["loss"] >= 0
    with torch.no_grad():
        expected = student.tower(tokens) @ teacher.text.text_projection
        torch.testing.assert_close(model.encode_text(tokens), expected, rtol=1e-4, atol=1e-5)
        image = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(model.encode_image(image), teacher.encode_image(image))


def test_default_multilingual_names_the_installed_model(built, tmp_path, monkeypatch):
    teacher_dir, out = built
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train-multilingual"):
        clipforge.load("default-multilingual")
    rc = main(["train-multilingual", "--teacher", str(teacher_dir), "--student", str(out / STUDENT_DIR)])
    assert rc == 0
    model, _, tok = clipforge.load("default-multilingual")
    assert tok.vocab_size == load_student(out / STUDENT_DIR).tokenizer.vocab_size


def test_student_of_another_teacher_is_refused(built, tmp_path, capsys):
    _, out = built
    other = write_teacher(tmp_path / "other", seed=1)
    with pytest.raises(MultilingualError, match="another text trunk"):
        assemble_dir(other, out / STUDENT_DIR, tmp_path / "m")
    rc = main(
        [
            "train-multilingual",
            "--teacher",
            str(other),
            "--student",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert rc == 2 and "student.json" in capsys.readouterr().err


def test_student_from_teacher_starts_as_the_teacher(tmp_path):
    """With all the teacher's layers and its own vocabulary, the initial student computes the teacher's pooled
    features; with a new vocabulary, the tokens both hold keep the teacher's embeddings."""
    teacher, _, teacher_tok = clipforge.load(write_teacher(tmp_path / "t"))
    cfg = DistillConfig(layers=teacher.config.text.layers, context_length=24)
    student = student_from_teacher(teacher.text, teacher_tok, teacher_tok, cfg).eval()
    tokens = teacher_tok(["a red apple", "pizza with cheese: slice"])
    with torch.no_grad():
        torch.testing.assert_close(student(tokens), teacher.text.trunk(tokens, 0))
    other = train_wordpiece(["pomme rouge", "red apple", "赤リンゴ"], 60)
    student = student_from_teacher(
        teacher.text, teacher_tok, other, DistillConfig(layers=1, context_length=24)
    )
    theirs, mine = teacher_tok.get_vocab(), other.get_vocab()
    emb = student.token_embedding.weight
    torch.testing.assert_close(emb[mine["apple"]], teacher.text.token_embedding.weight[theirs["apple"]])
    assert "pomme" not in theirs and not torch.equal(emb[mine["pomme"]], torch.zeros_like(emb[0]))
    with pytest.raises(MultilingualError, match="learned positions"):
        student_from_teacher(teacher.text, teacher_tok, other, DistillConfig(layers=1, context_length=64))


def test_student_from_scratch_has_its_own_size():
    tok = train_wordpiece(["pomme rouge", "red apple"], 60)
    cfg = DistillConfig(width=24, heads=3, layers=2, context_length=16, from_teacher=False)
    student = new_student(tok, cfg, teacher_width=32)
    assert student.cfg.width == 24 and student.text_projection.shape == (24, 32)
    assert torch.isfinite(student(tok(["pomme"], context_length=16))).all()


def test_extended_vocabulary_keeps_the_teachers_ids_and_reads_english_as_it():
    teacher_tok = train_wordpiece(CAPTIONS + ["flag of France", "snowman"], 120)
    other = train_wordpiece(["pomme rouge", "bonhomme de neige", "赤リンゴ", "แอปเปิ้ลแดง"], 80)
    tok = extend_wordpiece(teacher_tok, other)
    theirs, mine = teacher_tok.get_vocab(), tok.get_vocab()
    assert all(mine[t] == i for t, i in theirs.items())  # row for row: the teacher's embeddings carry over
    assert mine["pomme"] >= teacher_tok.vocab_size and tok.vocab_size > teacher_tok.vocab_size
    for text in CAPTIONS + ["a snowman", "flag of France"]:
        assert tok.encode(text) == teacher_tok.encode(text)
    assert tok.unknown_characters("pomme rouge 赤リンゴ แอปเปิ้ลแดง") == []
    assert tok("a red apple")[0, 0] == teacher_tok.cls_token_id


def test_new_tokens_only_keeps_english_exactly_the_teachers(tmp_path, corpus):
    teacher_dir = write_teacher(tmp_path / "t")
    teacher, _, teacher_tok = clipforge.load(teacher_dir)
    cfg = dataclasses.replace(TINY, layers=2, new_tokens_only=True, lr=0.1)
    student = train_student(teacher_dir, corpus, cfg, tmp_path / "s", cache=tmp_path / "features")
    tok, tower = student.tokenizer, student.tower
    english = ["a red apple", "a cat on a table", "flag of France"]
    with torch.no_grad():
        torch.testing.assert_close(tower(tok(english)), teacher.text.trunk(teacher_tok(english), 0))
    first_new = teacher_tok.vocab_size
    emb = tower.token_embedding.weight
    assert torch.equal(emb[:first_new], teacher.text.token_embedding.weight)
    # The added tokens did train: a fresh student from the same seed starts elsewhere.
    torch.manual_seed(cfg.seed)
    start = student_from_teacher(teacher.text, teacher_tok, tok, dataclasses.replace(cfg, context_length=24))
    assert not torch.equal(emb[first_new:], start.token_embedding.weight[first_new:])


def test_new_tokens_only_needs_the_whole_teacher(tmp_path, corpus):
    with pytest.raises(ValueError, match="needs from_teacher"):
        DistillConfig(new_tokens_only=True)
    teacher_dir = write_teacher(tmp_path / "t")
    with pytest.raises(MultilingualError, match="--layers must be its 2"):
        train_student(teacher_dir, corpus, dataclasses.replace(TINY, layers=1, new_tokens_only=True))
