"""BERT's WordPiece tokenizer for BERT-family text towers, run by the tokenizers library from a tokenizer.json.

A checkpoint records which tokenizer its text tower reads through the file itself: a tokenizer.json whose model
type is "WordPiece" loads as this class, CLIP's vocab.json + merges.txt as `clipforge.tokenizer.Tokenizer`
(see `clipforge.tokenizer.get_tokenizer`); the text tower's config says which kind it needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as _RustTokenizer

from clipforge.tokens import to_context, tokenizer_json_type


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer, run by the tokenizers library as its tokenizer.json says (normaliser,
    pre-tokenizer, [CLS]/[SEP] post-processor): `tokenizer(texts)` -> LongTensor (N, context_length) of
    [CLS] ... [SEP] [PAD] ... . Too long a text is cut with [SEP] kept last, as CLIP's tokenizer keeps eot."""

    kind = "wordpiece"

    def __init__(self, backend: _RustTokenizer, context_length: int = 64, source: str = "tokenizer.json"):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 ([CLS] and [SEP]), got {context_length}")
        # Truncation and padding happen below, per call: a shared backend must not change state per call.
        backend.no_truncation()
        backend.no_padding()
        specials = backend.encode("").ids
        if len(specials) != 2:
            raise ValueError(
                f"{source}: expected a post-processor adding [CLS] and [SEP], got ids {specials}"
            )
        pad = backend.token_to_id("[PAD]")
        if pad is None:
            raise ValueError(f"{source}: no [PAD] token in the vocabulary")
        self._backend = backend
        self.context_length = context_length
        self.cls_token_id, self.sep_token_id = specials
        self.pad_token_id = pad

    # The names code written for CLIP's tokens reads.
    sot_token_id = property(lambda self: self.cls_token_id)
    eot_token_id = property(lambda self: self.sep_token_id)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """token -> id, the ## continuation pieces included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP] and without truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = [enc.ids for enc in self._backend.encode_batch(list(texts))]
        n_ctx = self.context_length if context_length is None else context_length
        return to_context(rows, texts, n_ctx, self.pad_token_id, truncate, "[CLS]/[SEP]")

    def unknown_characters(self, text: str) -> list[str]:
        """The characters of `text` the vocabulary cannot represent, in order of first appearance: WordPiece
        turns a whole word holding one of them into [UNK], so a caller can name the culprit instead."""
        vocab = self._backend.get_vocab()
        normalizer = self._backend.normalizer
        out = []
        for ch in dict.fromkeys(text):
            seen = normalizer.normalize_str(ch) if normalizer is not None else ch
            if any(c not in vocab and f"##{c}" not in vocab for c in seen if not c.isspace()):
                out.append(ch)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text, without [CLS], [SEP] and padding (whether or not the file marks them special)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        specials = (self.cls_token_id, self.sep_token_id, self.pad_token_id)
        return self._backend.decode([i for i in ids if i not in specials], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (the whole pipeline; transformers' tokenizers read it too)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))

    @classmethod
    def from_pretrained(cls, path: str | Path, context_length: int = 64) -> WordPieceTokenizer:
        """A directory holding tokenizer.json, or the file itself."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no WordPiece tokenizer at {path} (tokenizer.json missing)")
        if tokenizer_json_type(file) != "WordPiece":
            raise ValueError(f"{file}: not a WordPiece tokenizer (model type {tokenizer_json_type(file)!r})")
        try:
            backend = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValueError(f"{file}: unreadable tokenizer.json ({e})") from None
        return cls(backend, context_length=context_length, source=str(file))


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: Iterable[str], vocab_size: int, context_length: int = 64) -> WordPieceTokenizer:
    """A WordPiece vocabulary learnt from `texts` for any script: NFKC and lower-casing but no accent
    stripping (which would delete the vowel signs of Devanagari, Bengali or Thai), CJK ideographs split one
    per token as BERT does, and every character of the texts in the vocabulary; others read as [UNK]."""
    from tokenizers import normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece

    backend = _RustTokenizer(WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=True
            ),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer keeps a character in the form it was seen in (word-initial or ##-continued); with both forms
    # of each, a word fails only on a character never seen, which `unknown_characters` then names.
    vocab = backend.get_vocab()
    chars = {t.removeprefix("##") for t in vocab if len(t.removeprefix("##")) == 1}
    for form in sorted({f for c in chars for f in (c, f"##{c}")} - set(vocab)):
        vocab[form] = len(vocab)
    backend.model = WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    _frame_with_cls_sep(backend)
    return WordPieceTokenizer(backend, context_length=context_length, source="trained WordPiece")


def _frame_with_cls_sep(backend: _RustTokenizer) -> None:
    """BERT's framing of a single text, with this vocabulary's ids of [CLS] and [SEP]."""
    from tokenizers import processors

    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def extend_wordpiece(
    base: WordPieceTokenizer, extra: WordPieceTokenizer, context_length: int | None = None
) -> WordPieceTokenizer:
    """`base`'s vocabulary with its ids kept, then every token of `extra` it lacks, read with `extra`'s
    normaliser and pre-tokenizer. A word `base` reads whole keeps its id, so a model's embeddings of `base`'s
    tokens carry over row for row; the pipeline is `extra`'s (for a vocabulary trained by `train_wordpiece`:
    no accent stripping, so every script keeps its vowel signs), which reads plain ASCII as `base` does."""
    from tokenizers.models import WordPiece

    vocab = dict(base.get_vocab())
    for token, _ in sorted(extra.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    backend = _RustTokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = extra._backend.normalizer
    backend.pre_tokenizer = extra._backend.pre_tokenizer
    _frame_with_cls_sep(backend)  # base's ids: its tokens keep theirs
    n_ctx = base.context_length if context_length is None else context_length
    return WordPieceTokenizer(backend, context_length=n_ctx, source="extended WordPiece")
