"""Parallel phrases for a multilingual text tower, from the open corpus's own text package: emojibase-data gives
each emoji a CLDR label and keywords in some 28 locales, so every emoji pairs its label (and its label with
keywords) in each locale with the same in English.

They are split by concept exactly as the corpus is (`corpus.concept_in_heldout` with the fraction and seed in
the corpus's corpus.json, on the concept the corpus gives the emoji: its English CLDR name), so a concept held
out of the corpus is held out here in every language, and a model distilled on the train side never saw it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from clipforge.data import captions as cap
from clipforge.data.corpus import NPM_PACKAGES, CorpusError, concept_in_heldout, emojibase_index

ENGLISH = "en"
KEYWORDS_PER_PHRASE = 4  # as many as the corpus's emoji captions carry


@dataclass(frozen=True)
class Phrase:
    locale: str
    text: str  # in the locale
    english: str  # the same emoji's phrase in English: what the teacher embeds
    concept: str  # the corpus's concept of the emoji
    kind: str  # "label" (the CLDR name alone) or "keywords" (name: keyword, keyword, ...)


def emojibase_package(corpus: str | Path) -> Path:
    """The unpacked emojibase-data package of a corpus folder (fetched by `clipforge data fetch-corpus`)."""
    name, version = NPM_PACKAGES["emojibase"].rsplit("@", 1)
    pkg = Path(corpus) / "downloads" / "npm" / f"{name}-{version}" / "package"
    if not (pkg / ENGLISH / "data.json").is_file():
        raise CorpusError(f"{pkg}: no emojibase-data package with {ENGLISH}/data.json (fetch the corpus)")
    return pkg


def locales(pkg: Path) -> list[str]:
    """Every locale folder of the package (those with a data.json), English included."""
    return sorted(d.name for d in pkg.iterdir() if (d / "data.json").is_file())


def corpus_split(corpus: str | Path) -> tuple[float, int]:
    """(held-out fraction, seed) the corpus was split with, from its corpus.json."""
    path = Path(corpus) / "corpus.json"
    try:
        cfg = json.loads(path.read_text("utf-8"))["config"]
        return float(cfg["heldout_fraction"]), int(cfg["seed"])
    except FileNotFoundError:
        raise CorpusError(f"{path} is missing: fetch the corpus first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(f"{path}: no config.heldout_fraction and config.seed ({e!r})") from None


def _keywords(label: str, tags: list[str]) -> str:
    words = [t for t in dict.fromkeys(tags) if t and t.lower() != label.lower()][:KEYWORDS_PER_PHRASE]
    return f"{label}: {', '.join(words)}" if words else ""


def emoji_phrases(pkg: Path, langs: list[str] | None = None) -> list[Phrase]:
    """Each emoji's label, and label with keywords, in each locale beside the same in English."""
    english = emojibase_index(pkg, ENGLISH)
    out = []
    for locale in langs if langs is not None else locales(pkg):
        if not (pkg / locale / "data.json").is_file():
            raise CorpusError(f"{pkg}: no locale {locale!r}; available: {locales(pkg)}")
        for key, (label, tags) in sorted(emojibase_index(pkg, locale).items()):
            if key not in english:
                continue
            en_label, en_tags = english[key]
            concept = cap.emoji_name(en_label)  # the corpus's concept for this emoji's images
            text = html.unescape(label).strip()
            out.append(Phrase(locale, text, concept, concept, "label"))
            kw, en_kw = _keywords(text, tags), _keywords(concept, en_tags)
            if kw and en_kw:
                out.append(Phrase(locale, kw, en_kw, concept, "keywords"))
    return out


def split_phrases(phrases: list[Phrase], fraction: float, seed: int) -> tuple[list[Phrase], list[Phrase]]:
    """(train, held out), by concept with the corpus's rule."""
    train, heldout = [], []
    for p in phrases:
        (heldout if concept_in_heldout(p.concept, fraction, seed) else train).append(p)
    return train, heldout
