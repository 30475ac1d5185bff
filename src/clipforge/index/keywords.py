"""The words of a row for keyword search, and of a query, split the same way on both sides.

A file name is split on `_`, `-`, `.`, spaces and camelCase or letter/digit boundaries ("IMG_2041-beachDay.jpg"
-> img 2041 beach day jpg), so a query word matches a part of a name; captions and metadata values are split on
anything that is not a letter or digit. Everything is lower-cased (SQLite's FTS5 unicode61 tokenizer, which
reads these strings, folds case too). The SQL side (FTS5, BM25) is in db.py.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

# camelCase / PascalCase / digit boundaries: "beachDay2019" -> "beach Day 2019", "HTMLPage" -> "HTML Page"
_BOUNDARY = re.compile(
    r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])"
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


def tokens(text: str) -> list[str]:
    """Lower-cased words of `text`, camelCase and digit runs split."""
    return [w.lower() for part in _WORD.findall(text) for w in _BOUNDARY.split(part) if w]


def name_text(key: str | None) -> str:
    """The searchable words of a row's file name (the base name and its folder's name)."""
    if not key:
        return ""
    p = PurePath(key)
    return " ".join(tokens(p.name) + tokens(p.parent.name))


def metadata_text(metadata: dict[str, Any]) -> str:
    """The words of the metadata's values (strings, numbers, lists of them; nested dicts too)."""
    out: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
            out.extend(tokens(str(v)))

    walk(metadata)
    return " ".join(out)


def match_expression(words: list[str]) -> str:
    """An FTS5 query matching rows holding any of `words` (BM25 then ranks rows holding more, rarer ones,
    first). Each word is quoted, so no word is read as an FTS5 operator."""
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in dict.fromkeys(words))
