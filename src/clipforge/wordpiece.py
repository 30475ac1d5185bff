"""BERT's WordPiece tokenizer for BERT-family text towers, run by the tokenizers library from a tokenizer.json.

A checkpoint records which tokenizer its text tower reads through the file itself: a tokenizer.json whose model
type is "WordPiece" loads as this class, CLIP's vocab.json + merges.txt as `clipforge.tokenizer.Tokenizer`
(see `clipforge.tokenizer.get_tokenizer`); the text tower's config says which kind it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
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
