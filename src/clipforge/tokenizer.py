"""CLIP's byte-level BPE tokenizer, on the `tokenizers` library, and training of new vocabularies.

The algorithm is OpenAI's: clean the text (ftfy, HTML entities, whitespace, lower case), split it with the
CLIP regex, map each piece's UTF-8 bytes to printable characters with the GPT-2 byte table, then apply BPE
with `</w>` marking the end of each piece. Cleaning and splitting run in Python so that they match the
reference exactly; the BPE of whole batches runs in Rust through `tokenizers`.

Vocabulary layout (OpenAI's, kept for trained vocabularies too): the 256 byte symbols, the same with `</w>`,
one token per merge, then `<|startoftext|>` and `<|endoftext|>` last.
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import ftfy
import regex
import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from clipforge.tokens import read_json_object, to_context, tokenizer_json_type

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
EOW = "</w>"
# OpenAI keeps the first 49152 - 256 - 2 merges of bpe_simple_vocab_16e6.txt.gz (49408 tokens in all).
OPENAI_NUM_MERGES = 49152 - 256 - 2

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")

if TYPE_CHECKING:
    from clipforge.wordpiece import WordPieceTokenizer


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte table: each byte -> a printable character (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    # Insertion order (printable bytes first) is the order of the first 256 ids of OpenAI's vocabulary.
    return table


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def byte_symbols() -> list[str]:
    """The 512 base tokens in OpenAI's order: the 256 byte symbols, then the same with `</w>`."""
    bare = list(bytes_to_unicode().values())
    return bare + [s + EOW for s in bare]


def clean_text(text: str) -> str:
    """CLIP's normalisation: ftfy, HTML entities (unescaped twice, as OpenAI does), whitespace, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def split_words(text: str) -> list[str]:
    """Clean `text` and split it into CLIP's pre-tokens (words, single digits, punctuation runs)."""
    return _SPLIT.findall(clean_text(text))


def _to_byte_symbols(word: str) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in word.encode("utf-8"))


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _RustTokenizer:
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix=EOW,
        continuing_subword_prefix="",
        fuse_unk=False,
        unk_token=None,
    )
    backend = _RustTokenizer(bpe)
    # Words arrive already split (Python regex); ByteLevel only maps each word's bytes to symbols.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # A literal "<|endoftext|>" in a text becomes the special token, as in OpenAI's BPE cache.
    backend.add_special_tokens([SOT, EOT])
    return backend


class Tokenizer:
    """CLIP tokenizer: `tokenizer(texts)` -> LongTensor (N, context_length) of [sot, ..., eot, 0, 0, ...]."""

    kind = "bpe"

    pad_token_id: int = 0  # OpenAI's clip.tokenize pads with 0 (which is also the "!" token)

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        context_length: int = 77,
        source: str = "vocabulary",
    ):
        _check_vocab(vocab, merges, source=source)
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (sot and eot), got {context_length}")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.context_length = context_length
        self.sot_token_id = vocab[SOT]
        self.eot_token_id = vocab[EOT]
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._backend = _build_backend(self.vocab, self.merges)

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without sot/eot and without truncation."""
        return self._encode_batch([text])[0]

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        words = [split_words(t) for t in texts]
        encodings = self._backend.encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """Tokenize a text or a batch -> LongTensor (N, context_length).

        Too long a text is cut with eot kept in the last position, or, with `truncate=False`, rejected.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = [[self.sot_token_id, *ids, self.eot_token_id] for ids in self._encode_batch(texts)]
        n_ctx = self.context_length if context_length is None else context_length
        return to_context(ids, texts, n_ctx, self.pad_token_id, truncate, "sot/eot")

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text. Drops sot, stops at the first eot (what follows is padding), `</w>` -> space."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        try:
            tokens = [self._id_to_token[i] for i in ids if i != self.sot_token_id]
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocabulary of size {self.vocab_size}"
            ) from e
        symbols = "".join(tokens)
        table = _unicode_to_bytes()
        data = bytes(table[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(EOW, " ").strip()

    def save(self, directory: str | Path) -> None:
        """Write the Hugging Face CLIP layout (vocab.json, merges.txt, configs) readable by CLIPTokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (directory / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            **special,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path, context_length: int = 77) -> Tokenizer:
        """Load a Hugging Face directory (vocab.json + merges.txt, or tokenizer.json) or OpenAI's .txt.gz."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist")
        if path.is_dir():
            vocab, merges = _read_hf_directory(path)
        else:
            vocab, merges = _read_openai_merges(path)
        return cls(vocab, merges, context_length=context_length, source=str(path))


AnyTokenizer = Union[Tokenizer, "WordPieceTokenizer"]  # what a text tower is fed by


def get_tokenizer(path: str | Path, context_length: int = 77) -> AnyTokenizer:
    """The tokenizer a vocabulary path holds: WordPiece for a tokenizer.json of that kind (BERT-family text
    towers), else CLIP's BPE (see `Tokenizer.from_pretrained`)."""
    p = Path(path)
    if p.is_dir() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        return Tokenizer.from_pretrained(p, context_length=context_length)
    file = p / "tokenizer.json" if p.is_dir() else p
    if file.name.endswith(".json") and file.is_file() and tokenizer_json_type(file) == "WordPiece":
        from clipforge.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.from_pretrained(file, context_length=context_length)
    return Tokenizer.from_pretrained(p, context_length=context_length)


def _check_vocab(vocab: dict[str, int], merges: Sequence[tuple[str, str]], source: str) -> None:
    """Refuse vocabularies that would silently drop bytes or lack CLIP's special tokens."""
    missing = [t for t in (SOT, EOT, *byte_symbols()) if t not in vocab]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:5])
        raise ValueError(f"{source}: vocabulary lacks {len(missing)} required tokens (e.g. {shown})")
    if len(set(vocab.values())) != len(vocab):
        raise ValueError(f"{source}: vocabulary maps several tokens to the same id")
    for a, b in merges:
        if a + b not in vocab:
            raise ValueError(f"{source}: merge {a!r} {b!r} makes {a + b!r}, which is not in the vocabulary")


def _parse_merge_lines(lines: Iterable[str], source: Path, first_line: int = 1) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {number} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_openai_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz: a version line, then one merge "a b" per line."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: not a gzip text file of BPE merges ({e})") from e
    merges = _parse_merge_lines(lines[1:], path, first_line=2)[:OPENAI_NUM_MERGES]
    tokens = byte_symbols() + [a + b for a, b in merges] + [SOT, EOT]
    return _index_tokens(tokens), merges


def _index_tokens(tokens: list[str]) -> dict[str, int]:
    # A merge result repeated in the list keeps its first id; ids stay contiguous.
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def _read_hf_directory(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_file, merges_file, tokenizer_file = (
        path / "vocab.json",
        path / "merges.txt",
        path / "tokenizer.json",
    )
    if vocab_file.is_file() and merges_file.is_file():
        vocab = read_json_object(vocab_file)
        lines = merges_file.read_text(encoding="utf-8").split("\n")
        header = 1 if lines and lines[0].startswith("#version") else 0
        return vocab, _parse_merge_lines(lines[header:], merges_file, first_line=1 + header)
    if tokenizer_file.is_file():
        return _read_tokenizer_json(tokenizer_file)
    raise ValueError(f"{path}: found neither vocab.json + merges.txt nor tokenizer.json")


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = read_json_object(path).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: not a BPE tokenizer (model type {model.get('type')!r})")
    vocab = dict(model["vocab"])
    # Older files write merges as "a b" strings, newer ones as [a, b] pairs.
    raw = model.get("merges", [])
    lines = [m if isinstance(m, str) else " ".join(m) for m in raw]
    return vocab, _parse_merge_lines(lines, path)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, context_length: int = 77, min_frequency: int = 2
) -> Tokenizer:
    """Learn a CLIP-style vocabulary of at most `vocab_size` tokens from captions.

    The vocabulary holds the 512 byte symbols (so no character is ever dropped), the learned merges, then
    sot and eot last. A small corpus may run out of pairs seen `min_frequency` times before `vocab_size`.
    """
    num_merges = vocab_size - len(byte_symbols()) - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least 514 (512 byte symbols + sot + eot), got {vocab_size}")
    merges = _learn_merges(texts, num_merges, min_frequency)
    tokens = byte_symbols() + [a + b for a, b in merges] + [SOT, EOT]
    return Tokenizer(_index_tokens(tokens), merges, context_length=context_length)


def _learn_merges(texts: Iterable[str], num_merges: int, min_frequency: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from the captions' words, most frequent pair first.

    Written here rather than with the tokenizers library's BpeTrainer, which breaks ties between equally
    frequent pairs in hash order: the same captions gave different vocabularies in two processes. Ties here go
    to the lexicographically smallest pair, so a vocabulary is reproducible. Pair counts are updated
    incrementally (only words holding the merged pair are touched), with a lazy max-heap over pairs."""
    if num_merges == 0:
        return []
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_to_byte_symbols(w) for w in split_words(text) if w not in (SOT, EOT))
    words: list[list[str]] = []
    freqs: list[int] = []
    for word, n in sorted(counts.items()):
        symbols = list(word)
        symbols[-1] += EOW
        words.append(symbols)
        freqs.append(n)

    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    while heap and len(merges) < num_merges:
        negative, pair = heapq.heappop(heap)
        if -negative != pairs.get(pair, 0):
            continue  # a stale entry: the pair's count changed after it was pushed
        if -negative < min_frequency:
            break
        merges.append(pair)
        a, b = pair
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old = words[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(a + b)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue
            for p in zip(old, old[1:]):
                pairs[p] -= freqs[i]
                changed.add(p)
            for p in zip(new, new[1:]):
                pairs[p] += freqs[i]
                where[p].add(i)
                changed.add(p)
            words[i] = new
        pairs.pop(pair, None)
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
            else:
                pairs.pop(p, None)
    return merges
