"""A multilingual text tower for a CLIP model whose text tower is BERT-family (the default model's MiniLM), by
teacher learning (Reimers & Gurevych, 2020, as Multilingual-CLIP did): a small student BERT with its own
WordPiece vocabulary learns to reproduce the teacher tower's POOLED sentence embedding (masked mean, before the
CLIP projection) of an English phrase from the same phrase in any locale, and of the corpus's English captions
from themselves so that English holds.

Because the student matches the pooled features, it does not depend on the CLIP projection: any model whose
text trunk is the teacher's becomes multilingual by swapping the trunk for the student and keeping its
projection. The student ends in a linear map (no bias) into the teacher's width, so the assembled tower's
projection is that map times the model's projection, one matrix, and the result is an ordinary BERT-kind
clipforge checkpoint that `clipforge.load` reads.

    OUT/                    the multilingual model (clipforge.json, model.safetensors, tokenizer.json, ...)
    OUT/student/            student.json (config, teacher fingerprint, data), student.safetensors,
                            tokenizer.json, log.jsonl: re-assemble with another projection by `assemble_dir`

Data: clipforge.data.parallel (emojibase labels and keywords in 28 locales, split by the corpus's concepts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from clipforge import paths
from clipforge.data import parallel
from clipforge.data.sources import read_manifest
from clipforge.model.bert import BertTextTower
from clipforge.model.clip import CLIP
from clipforge.model.config import BertTextConfig
from clipforge.wordpiece import WordPieceTokenizer, extend_wordpiece, train_wordpiece

STUDENT_DIR = "student"
STUDENT_META = "student.json"
STUDENT_WEIGHTS = "student.safetensors"


class MultilingualError(ValueError):
    """A teacher, student or corpus that cannot make a multilingual model: named, with the reason."""


@dataclass(frozen=True)
class DistillConfig:
    width: int = 256
    layers: int = 4
    heads: int = 4
    vocab_size: int = 16000  # before the characters' second forms (see train_wordpiece)
    context_length: int = 32  # labels and captions are short; longer texts are cut
    batch_size: int = 128
    lr: float = 1e-3
    warmup: float = 0.05  # fraction of the run
    steps: int = 5000  # at most; the run also ends at max_minutes
    max_minutes: float = 10.0
    english_fraction: float = 0.3  # share of each batch taken from the corpus's English training captions
    # At most this many captions, sampled from train.jsonl (their teacher features are computed once).
    english_captions: int = 30000
    # Start from the teacher's first `layers` layers (width and heads then are the teacher's), with the teacher's
    # vocabulary extended by the tokens of the other locales' text (extend_wordpiece): the teacher's tokens keep
    # its embeddings row for row, so English reads as the teacher reads it.
    from_teacher: bool = False
    # With from_teacher and all the teacher's layers: train only the embeddings of the added tokens, everything
    # else stays the teacher's, so a text of the teacher's own tokens (plain English) embeds exactly as the
    # teacher embeds it. The student then reads the teacher's context.
    new_tokens_only: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.english_fraction <= 1.0:
            raise ValueError(f"english_fraction must be in [0, 1], got {self.english_fraction}")
        for name in ("width", "layers", "heads", "vocab_size", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.new_tokens_only and not self.from_teacher:
            raise ValueError(
                "new_tokens_only trains the tokens added to the teacher's: it needs from_teacher"
            )


@dataclass
class Student:
    tower: BertTextTower  # its `text_projection` maps into the teacher's pooled space (width_t)
    tokenizer: WordPieceTokenizer
    meta: dict[str, Any]  # teacher_trunk (fingerprint), teacher_width, locales, counts, config


# --------------------------------------------------------------------------------------------- the teacher


def _lock_text(model: CLIP) -> None:
    """Only the projection trainable, as in a locked text tower: the feature cache's fingerprint of the trunk
    then covers every other weight, and the features cached while training the model are reused."""
    for name, p in model.text.named_parameters():
        p.requires_grad_(name == "text_projection")


def teacher_trunk_id(model: CLIP, tokenizer: WordPieceTokenizer) -> str:
    """What the student depends on: the teacher's text trunk (weights below the projection, config) and its
    tokenizer."""
    from clipforge.train import features as ft

    _lock_text(model)
    config = {"text": model.config.to_dict()["text"], "activation": model.config.activation}
    trunk = ft.trunk_fingerprint(model.text, config)
    return hashlib.sha256(f"{trunk} {ft.tokenizer_identity(tokenizer)}".encode()).hexdigest()


def load_teacher(model_dir: str | Path) -> tuple[CLIP, WordPieceTokenizer]:
    """A checkpoint with a BERT-family text tower and its WordPiece tokenizer."""
    from clipforge.checkpoint import load

    model, _, tokenizer = load(model_dir)
    if not isinstance(model.config.text, BertTextConfig) or not isinstance(tokenizer, WordPieceTokenizer):
        raise MultilingualError(
            f"{model_dir}: the teacher needs a BERT-family text tower with its tokenizer.json (as the "
            f"effnet-lite0-minilm preset), found a {type(model.config.text).__name__}"
        )
    return model, tokenizer


def teacher_features(
    model: CLIP, tokenizer: WordPieceTokenizer, texts: list[str], cache: Path, progress: bool = False
) -> torch.Tensor:
    """(N, width) pooled features of the teacher's text trunk, through the locked towers' feature cache."""
    from clipforge.train import features as ft

    _lock_text(model)
    store = ft.text_store(cache, model.text, model.config, tokenizer, 0)
    keys, _ = ft.build_text_features(store, model.text, 0, texts, tokenizer, progress=progress)
    return store.read(keys)[0]


# --------------------------------------------------------------------------------------------- the data


def english_captions(corpus: Path, limit: int, seed: int) -> list[str]:
    """Up to `limit` distinct captions of the corpus's train.jsonl, a seeded sample."""
    path = corpus / "train.jsonl"
    if not path.is_file():
        raise MultilingualError(f"{path} is missing: fetch the corpus first")
    # The one reader of manifests (data/sources.py), so a caption here is the caption training reads.
    captions = dict.fromkeys(c for sample in read_manifest(path) for c in sample.captions)
    out = sorted(captions)
    random.Random(seed).shuffle(out)
    return out[:limit]


@dataclass
class DistillData:
    texts: list[str]  # what the student reads
    targets: list[int]  # row of `english` each text must reproduce
    english: list[str]  # distinct English texts the teacher embeds
    captions: int  # texts[:captions] are the English captions, the rest parallel phrases
    locales: list[str]
    foreign: list[str]  # phrases of the locales other than English: what extends a teacher's vocabulary


def distill_data(corpus: Path, cfg: DistillConfig) -> DistillData:
    pkg = parallel.emojibase_package(corpus)
    langs = parallel.locales(pkg)
    fraction, seed = parallel.corpus_split(corpus)
    train, _ = parallel.split_phrases(parallel.emoji_phrases(pkg, langs), fraction, seed)
    caps = english_captions(corpus, cfg.english_captions, cfg.seed)
    english = list(dict.fromkeys(caps + [p.english for p in train]))
    row = {t: i for i, t in enumerate(english)}
    texts = caps + [p.text for p in train]
    foreign = [p.text for p in train if p.locale.split("-")[0] != parallel.ENGLISH]
    return DistillData(
        texts, [row[t] for t in caps] + [row[p.english] for p in train], english, len(caps), langs, foreign
    )


# --------------------------------------------------------------------------------------------- training


def new_student(tokenizer: WordPieceTokenizer, cfg: DistillConfig, teacher_width: int) -> BertTextTower:
    tcfg = BertTextConfig(
        context_length=cfg.context_length,
        vocab_size=tokenizer.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        max_positions=cfg.context_length,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    tower = BertTextTower(tcfg, teacher_width)
    tower.init_weights()
    return tower


def student_from_teacher(
    teacher: BertTextTower, teacher_tok: WordPieceTokenizer, tokenizer: WordPieceTokenizer, cfg: DistillConfig
) -> BertTextTower:
    """The teacher's embedding norm, positions and first `cfg.layers` layers; token embeddings copied for the
    tokens both vocabularies hold (English words, [CLS], shared Latin pieces), the others the mean of the
    teacher's embeddings of the pieces the teacher splits them into ("pomme": "po", "##mme"; a cognate starts
    near its English word), or drawn with the teacher's embedding statistics where the teacher reads only
    [UNK]; the map into the teacher's space starts as the identity."""
    t = teacher.cfg
    if not 1 <= cfg.layers <= t.layers:
        raise MultilingualError(
            f"a student from the teacher takes 1 to {t.layers} of its layers, not {cfg.layers}"
        )
    if cfg.context_length > t.max_positions:
        raise MultilingualError(
            f"context_length {cfg.context_length} is past the teacher's {t.max_positions} learned positions"
        )
    scfg = dataclasses.replace(
        t,
        layers=cfg.layers,
        vocab_size=tokenizer.vocab_size,
        context_length=cfg.context_length,
        max_positions=cfg.context_length,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )
    student = BertTextTower(scfg, t.width)
    with torch.no_grad():
        student.positional_embedding.copy_(teacher.positional_embedding[: cfg.context_length])
        student.segment_embedding.copy_(teacher.segment_embedding)
        student.ln_embed.load_state_dict(teacher.ln_embed.state_dict())
        for mine, theirs in zip(student.blocks, teacher.blocks):
            mine.load_state_dict(theirs.state_dict())
        w = teacher.token_embedding.weight  # (V_t, width)
        student.token_embedding.weight.normal_(float(w.mean()), float(w.std()))
        theirs = teacher_tok.get_vocab()
        shared = [(i, theirs[tok]) for tok, i in tokenizer.get_vocab().items() if tok in theirs]
        if shared:
            mine_ids, their_ids = map(list, zip(*shared))
            student.token_embedding.weight[mine_ids] = w[their_ids]
        unk = theirs.get("[UNK]")
        for token, i in tokenizer.get_vocab().items():
            pieces = (
                []
                if token in theirs
                else [j for j in teacher_tok.encode(token.removeprefix("##")) if j != unk]
            )
            if pieces:
                student.token_embedding.weight[i] = w[pieces].mean(dim=0)
        student.text_projection.copy_(torch.eye(t.width))
    return student


def train_new_tokens_only(
    tower: BertTextTower, data: DistillData, tokenizer: WordPieceTokenizer, first_new: int
) -> DistillData:
    """Freeze `tower` but for the embeddings of tokens `first_new` and up, and keep only the phrases holding such
    a token: the others, and the English captions, which English holds by construction, would train nothing."""
    for p in tower.parameters():
        p.requires_grad_(False)
    weight = tower.token_embedding.weight.requires_grad_(True)
    weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first_new]), g[first_new:]]))
    phrases = range(data.captions, len(data.texts))
    new = (tokenizer([data.texts[i] for i in phrases]) >= first_new).any(dim=1).tolist()
    rows = [i for i, n in zip(phrases, new) if n]
    if not rows:
        raise MultilingualError("no training phrase holds a token the teacher's vocabulary lacks")
    return dataclasses.replace(
        data, texts=[data.texts[i] for i in rows], targets=[data.targets[i] for i in rows], captions=0
    )


def _lr(cfg: DistillConfig, progress: float) -> float:
    if progress < cfg.warmup:
        return cfg.lr * progress / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - cfg.warmup) / (1 - cfg.warmup))))


def _batches(data: DistillData, cfg: DistillConfig, gen: torch.Generator):
    """Endless (B,) index batches: english_fraction of each from the captions, the rest from the phrases."""
    n_cap = round(cfg.batch_size * cfg.english_fraction) if data.captions else 0
    n_phr = cfg.batch_size - n_cap if len(data.texts) > data.captions else 0
    while True:
        caps = torch.randint(0, max(data.captions, 1), (n_cap,), generator=gen)
        phr = torch.randint(data.captions, max(len(data.texts), data.captions + 1), (n_phr,), generator=gen)
        yield torch.cat([caps, phr])


def distill(
    student: BertTextTower,
    data: DistillData,
    targets: torch.Tensor,
    tokenizer: WordPieceTokenizer,
    cfg: DistillConfig,
    log: Path | None = None,
) -> BertTextTower:
    """Train `student` on (text -> teacher row) by MSE, for cfg.steps or cfg.max_minutes, whichever ends
    first (the schedule follows whichever is further along); one JSON line of metrics per 20 steps to `log`."""
    # No weight decay when only new tokens train: it would shrink the teacher's rows, which get no gradient.
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0 if cfg.new_tokens_only else 0.01)
    tokens = tokenizer(data.texts, context_length=cfg.context_length)  # (N, T), cut to the context
    rows = torch.tensor(data.targets)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, budget = time.perf_counter(), cfg.max_minutes * 60
    student.train()
    with open(log, "w", encoding="utf-8") if log else contextlib.nullcontext() as f:
        for step, idx in enumerate(_batches(data, cfg, gen), 1):
            progress = max(step / cfg.steps, (time.perf_counter() - t0) / budget)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, min(progress, 1.0))
            pred, target = student(tokens[idx]), targets[rows[idx]]  # (B, width_t) each
            loss = F.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if f is not None and (step % 20 == 0 or progress >= 1):
                cos = F.cosine_similarity(pred.detach(), target, dim=-1).mean()
                row = {"step": step, "loss": loss.item(), "cos": cos.item(), "lr": opt.param_groups[0]["lr"]}
                f.write(json.dumps({**row, "seconds": round(time.perf_counter() - t0, 1)}) + "\n")
                f.flush()
            if progress >= 1:
                break
    return student.eval()


def train_student(
    teacher_dir: str | Path,
    corpus: str | Path | None = None,
    cfg: DistillConfig = DistillConfig(),
    out: str | Path | None = None,
    cache: str | Path | None = None,
    progress: bool = False,
) -> Student:
    """Data, vocabulary, teacher features and distillation; saved in `out` when given."""
    corpus = Path(corpus) if corpus is not None else paths.corpus_dir()
    cache = Path(cache) if cache is not None else paths.features_dir()
    teacher, teacher_tok = load_teacher(teacher_dir)
    data = distill_data(corpus, cfg)
    if cfg.new_tokens_only:
        if cfg.layers != teacher.config.text.layers:
            raise MultilingualError(
                f"new_tokens_only keeps the whole teacher: --layers must be its {teacher.config.text.layers}"
            )
        cfg = dataclasses.replace(cfg, context_length=teacher.config.text.context_length)
    # The vocabulary sees train-side text only: a token found only in held-out phrases would keep its random
    # initial embedding, which is worse for those queries than the pieces it splits into otherwise.
    if cfg.from_teacher:  # the other locales' tokens only: English words keep the teacher's pieces
        tokenizer = extend_wordpiece(
            teacher_tok, train_wordpiece(data.foreign, cfg.vocab_size), cfg.context_length
        )
    else:
        tokenizer = train_wordpiece(data.texts, cfg.vocab_size, cfg.context_length)
    targets = teacher_features(teacher, teacher_tok, data.english, cache, progress=progress)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.from_teacher:
        tower = student_from_teacher(teacher.text, teacher_tok, tokenizer, cfg)
    else:
        tower = new_student(tokenizer, cfg, targets.shape[1])
    if cfg.new_tokens_only:
        data = train_new_tokens_only(tower, data, tokenizer, teacher_tok.vocab_size)
    tower = distill(tower, data, targets, tokenizer, cfg, out_dir / "log.jsonl" if out_dir else None)
    meta = {
        "teacher": str(teacher_dir),
        "teacher_trunk": teacher_trunk_id(teacher, teacher_tok),
        "teacher_width": targets.shape[1],
        "locales": data.locales,
        "texts": {"captions": data.captions, "phrases": len(data.texts) - data.captions},
        "distill": dataclasses.asdict(cfg),
        "config": dataclasses.asdict(tower.cfg),
    }
    student = Student(tower, tokenizer, meta)
    if out_dir is not None:
        save_student(student, out_dir)
    return student


# --------------------------------------------------------------------------------------------- saving


def save_student(student: Student, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in student.tower.state_dict().items()}
    save_file(sd, str(directory / STUDENT_WEIGHTS))
    student.tokenizer.save(directory)
    (directory / STUDENT_META).write_text(json.dumps(student.meta, indent=1, ensure_ascii=False) + "\n")


def load_student(directory: str | Path) -> Student:
    d = Path(directory)
    try:
        meta = json.loads((d / STUDENT_META).read_text("utf-8"))
        tcfg = BertTextConfig(**meta["config"])
        width = int(meta["teacher_width"])
    except FileNotFoundError:
        raise MultilingualError(
            f"{d}: no {STUDENT_META} (not a student written by train-multilingual)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise MultilingualError(f"{d / STUDENT_META}: unreadable ({e!r})") from None
    tower = BertTextTower(tcfg, width)
    try:
        tower.load_state_dict(load_file(str(d / STUDENT_WEIGHTS)))
    except (OSError, RuntimeError) as e:
        raise MultilingualError(f"{d / STUDENT_WEIGHTS}: does not fit the student's config ({e})") from None
    tokenizer = WordPieceTokenizer.from_pretrained(d, context_length=tcfg.context_length)
    return Student(tower.eval(), tokenizer, meta)


# --------------------------------------------------------------------------------------------- assembly


def assemble(teacher: CLIP, teacher_tok: WordPieceTokenizer, student: Student) -> CLIP:
    """`teacher` with its text tower replaced by the student; the projection is the student's map into the
    teacher's pooled space followed by the teacher's own projection."""
    found = teacher_trunk_id(teacher, teacher_tok)
    if found != student.meta.get("teacher_trunk"):
        raise MultilingualError(
            f"the student was distilled from another text trunk ({student.meta.get('teacher')}) than this "
            "model's: its features would not match this model's projection"
        )
    name = f"{teacher.config.name or 'model'}-multilingual"
    model = CLIP(dataclasses.replace(teacher.config, text=student.tower.cfg, name=name))
    model.visual.load_state_dict(teacher.visual.state_dict())
    sd = dict(student.tower.state_dict())
    with torch.no_grad():
        sd["text_projection"] = student.tower.text_projection @ teacher.text.text_projection  # (w_s, D)
        model.text.load_state_dict(sd)
        model.logit_scale.copy_(teacher.logit_scale)
        if teacher.logit_bias is not None:
            model.logit_bias.copy_(teacher.logit_bias)
    return model.eval()


def assemble_dir(teacher_dir: str | Path, student_dir: str | Path, out: str | Path) -> Path:
    """Write the multilingual model of a teacher checkpoint and a saved student as a clipforge directory."""
    from clipforge.checkpoint import save_model

    teacher, teacher_tok = load_teacher(teacher_dir)
    student = load_student(student_dir)
    model = assemble(teacher, teacher_tok, student)
    extra = {"multilingual": {"teacher": str(teacher_dir), "locales": student.meta.get("locales", [])}}
    return save_model(model, out, tokenizer=student.tokenizer, extra=extra)


def train_multilingual(
    teacher_dir: str | Path,
    out: str | Path | None = None,
    corpus: str | Path | None = None,
    cfg: DistillConfig = DistillConfig(),
    cache: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """Distil a student (into OUT/student) and assemble the multilingual model in OUT (default: the place
    `default-multilingual` names)."""
    out_dir = Path(out) if out is not None else paths.multilingual_model_dir()
    train_student(teacher_dir, corpus, cfg, out_dir / STUDENT_DIR, cache, progress)
    return assemble_dir(teacher_dir, out_dir / STUDENT_DIR, out_dir)
