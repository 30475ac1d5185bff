"""Caption recipe for the open corpus: pure text functions, one family per source.

Every function here takes plain strings or dicts (the parsed package metadata) and returns plain strings, so
the recipe can be tested on hand-made inputs. The recipe itself is described in OPEN-CORPUS.md.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass

SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
# Longest first so "medium-dark" wins over "dark" when stripping a Fluent suffix.
_FLUENT_TONES = ("medium-light", "medium-dark", "medium", "light", "dark")

# Licence URIs in Open Clip Art's <cc:license> that mean a public-domain dedication.
_PD_LICENSES = {
    "http://web.resource.org/cc/PublicDomain",
    "http://creativecommons.org/licenses/publicdomain/",
    "http://creativecommons.org/publicdomain/zero/1.0/",
}

# Titles of whole collections, not of one drawing (matched on the lower-cased title).
_COLLECTION_TITLE = re.compile(
    r"gramastar|flat icon collection|svg theme|etiquette icons|aiga_symbol_signs|various cliparts"
    r"|gradient collection|collection|iconset|icon theme|-theme\b|^icons?$|^card$|^webicons$|^people$"
    r"|^advertising$|^map symbols$"
)
_CLIPART_BY = re.compile(r"^clip ?art by [^-]+ - (.+)$", re.I)
_NOISE_KEYWORDS = {
    "hash", "clip art", "clipart", "icon", "icons", "theme", "mapsym", "signs and symbols", "unsorted",
    "lemon theme icon", "magick", "special", "computer", "menu", "white", "action", "shape", "shapes",
}  # fmt: skip
# Folder names that say nothing about the drawing; the category is then taken one level up.
_WEAK_FOLDERS = {"unsorted", "duplicates", "miscellany", "simple", "white", "bordered", "ornamental", "svg"}
_PLURAL_WORDS = {"people", "men", "women", "children", "feet", "teeth", "mice", "geese", "dice"}
# Words starting with a vowel letter but a consonant sound, and the reverse.
_A_PREFIXES = ("uni", "use", "usu", "uti", "ure", "uro", "ufo", "usb", "one", "eu", "ewe", "ukulele")
_AN_PREFIXES = ("hour", "honest", "honou", "heir", "8", "11", "18")


@dataclass(frozen=True)
class SvgMeta:
    """What an Open Clip Art SVG says about itself in its <metadata> block."""

    title: str
    creator: str
    subjects: tuple[str, ...]
    license: str


def readable(text: str) -> str:
    """Lower-case, `_`/`-` to spaces, squeeze blanks: 'face-smiling' -> 'face smiling'."""
    text = html.unescape(text).lower().replace("_", " ").replace("-", " ")
    return re.sub(r"\s+", " ", text).strip(" .,;:")


def with_article(phrase: str) -> str:
    """'a cat', 'an owl', 'an hour', 'a unicorn'; plurals and 'the ...' phrases get none."""
    if not phrase or phrase.startswith(("the ", "a ", "an ")):
        return phrase
    head = re.split(r" (?:with|of|in|on|and)\b", phrase)[0].split()
    last = head[-1] if head else phrase
    if last in _PLURAL_WORDS or (last.endswith("s") and not last.endswith(("ss", "us", "is", "ous"))):
        return phrase
    low = phrase.lower()
    if low.startswith(_AN_PREFIXES):
        return "an " + phrase
    if low.startswith(_A_PREFIXES):
        return "a " + phrase
    return ("an " if low[0] in "aeiou" else "a ") + phrase


def _drop_numbers(words: list[str]) -> list[str]:
    """Drop trailing number words and digits glued to the last word ('guitar1' -> 'guitar'), keep '747'."""
    while len(words) > 1 and words[-1].isdigit():
        words.pop()
    return [re.sub(r"(?<=[a-z]{3})\d+$", "", w) for w in words]


def clean_name(text: str) -> str:
    """A file name or icon name as words: 'pencil_02' -> 'pencil', 'snow-capped-mountain' -> 'snow capped mountain'."""
    text = re.sub(r"\.svg$", "", text.strip(), flags=re.I)
    words = [w for w in re.split(r"[\s_\-]+", readable(text)) if w and w != "openclipart"]
    while words and words[0].isdigit() and len(words) > 1:
        words.pop(0)
    return " ".join(_drop_numbers(words))


# --- Open Clip Art -------------------------------------------------------------------------------------


def _first(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def parse_svg_metadata(svg: str) -> SvgMeta:
    """Title, creator, subjects and licence of an Open Clip Art SVG (empty strings when absent)."""
    work = _first(r"(<cc:Work\b.*?</cc:Work>)", svg)
    creator = _first(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", work)
    # The agents (creator, publisher, rights) carry their own <dc:title>: remove them to find the work's.
    own = re.sub(r"<cc:Agent\b.*?</cc:Agent>", "", work, flags=re.S)
    title = _first(r"<dc:title>(.*?)</dc:title>", own)
    subject = _first(r"<dc:subject>(.*?)</dc:subject>", own)
    subjects = tuple(html.unescape(s).strip() for s in re.findall(r"<rdf:li>(.*?)</rdf:li>", subject, re.S))
    license_ = _first(r"<cc:license\b[^>]*?rdf:resource=\"([^\"]*)\"", own)
    return SvgMeta(title=title, creator=creator, subjects=subjects, license=license_)


def is_public_domain(license_uri: str) -> bool:
    """Only an explicit public-domain dedication counts: GPL and unstated licences are dropped."""
    return license_uri.strip() in _PD_LICENSES


def is_collection_title(title: str) -> bool:
    """True for titles naming a whole collection ('gramastar', 'Lemon SVG theme', 'card', ...)."""
    return bool(_COLLECTION_TITLE.search(title.strip().lower()))


def title_thing(title: str, title_count: int, max_shared: int = 3) -> str:
    """The drawing's name from its title, or '' when the title is shared by many files or names a collection.

    'Clipart by Nicu Buculei - compact_disc' -> 'compact disc' (the part after the dash names the drawing).
    """
    if not title or title_count > max_shared:
        return ""
    m = _CLIPART_BY.match(title.strip())
    if m:
        title = m.group(1)
    if is_collection_title(title):
        return ""
    return clean_name(title)


def _is_author_tail(tail: list[str], author: list[str]) -> bool:
    """Each word of `tail` starts the matching word of the author's name (names are truncated in files)."""
    if not tail or len(tail) > len(author) or len(tail[0]) < 2:
        return False
    return all(a.startswith(re.sub(r"\d+$", "", t)) and re.sub(r"\d+$", "", t) for t, a in zip(tail, author))


def filename_thing(stem: str, creator: str) -> str:
    """'pencil_benji_park_01' by 'Benji Park' -> 'pencil': drop the numbers and the appended author name."""
    words = [w for w in re.split(r"[\s_\-]+", stem.lower()) if w]
    while len(words) > 1 and (words[-1].isdigit() or words[-1] in {"r", "s"}):
        words.pop()
    author = [w for w in re.split(r"[^a-z0-9]+", creator.lower()) if w]
    for i in range(1, len(words)):
        if _is_author_tail(words[i:], author):
            words = words[:i]
            break
    return clean_name(" ".join(words))


def category_from_path(rel_dir: str) -> str:
    """The last meaningful folder: 'food/fruit' -> 'fruit', 'recreation/games/cards/simple' -> 'cards'."""
    for part in reversed([p for p in rel_dir.split("/") if p and p != "."]):
        name = readable(part)
        if name not in _WEAK_FOLDERS and not name.endswith("theme"):
            return name
    return ""


def keywords(subjects: Sequence[str], exclude: Sequence[str] = (), limit: int = 3) -> list[str]:
    """dc:subject without noise words, duplicates, the drawing's own name or the author's name."""
    skip = _NOISE_KEYWORDS | {readable(e) for e in exclude}
    out: list[str] = []
    for s in subjects:
        k = readable(s)
        # Some files carry Python object reprs ("hash(0x874e7bc)") as keywords.
        if k and k not in skip and k not in out and has_enough_letters(k) and "(" not in k:
            out.append(k)
    return out[:limit]


def has_enough_letters(thing: str, minimum: int = 3) -> bool:
    return sum(c.isalpha() for c in thing) >= minimum


def openclipart_captions(thing: str, category: str, kws: Sequence[str]) -> list[str]:
    caps = [f"a clip art drawing of {with_article(thing)}", f"{thing}, clip art"]
    if category and category != thing:
        caps.append(f"{thing}, clip art from the {category} category")
    if kws:
        caps.append(f"{thing}: {', '.join(kws)}")
    return caps


# --- emoji (Noto, Twemoji, Fluent) --------------------------------------------------------------------


def hex_key(hexcode: str) -> str:
    """Join key between emoji-datasource, emojibase and iconify: upper-case code points without FE0F."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def emoji_name(label: str) -> str:
    """A CLDR / Unicode name as caption text: 'Egypt Flag' or 'flag: Egypt' -> 'flag of Egypt'.

    Country names keep their capitals (they are proper names); everything else is lower-cased.
    """
    label = html.unescape(label).strip()
    if label.lower().startswith("flag: "):
        return "flag of " + label[6:].strip()
    if label.endswith(" Flag") and not label.isupper():
        return "flag of " + label[:-5].strip()
    name = label.lower()
    if ": " in name:
        head, rest = name.split(": ", 1)
        if head in {"man", "woman", "person"}:
            name = f"{head} with {rest}"  # 'woman: beard' -> 'woman with beard'
        elif ", " in rest:
            first, last = rest.rsplit(", ", 1)  # 'kiss: woman, man' -> 'kiss of woman and man'
            name = f"{head} of {first} and {last}"
        else:
            name = f"{head} {rest}"
    return re.sub(r"\s+", " ", name.replace("_", " "))


def tone_phrase(tone_key: str) -> str:
    """'1F3FB' -> 'with light skin tone'; '1F3FB-1F3FF' -> 'with light and dark skin tones'."""
    tones = [SKIN_TONES[t] for t in tone_key.upper().split("-") if t in SKIN_TONES]
    if not tones:
        raise ValueError(f"not a skin-tone code: {tone_key!r}")
    if len(set(tones)) == 1:
        return f"with {tones[0]} skin tone"
    return f"with {tones[0]} and {tones[1]} skin tones"


def subcategory_name(subcategory: str) -> str:
    """'face-smiling' -> 'smiling face', 'animal-mammal' -> 'mammal', 'transport-air' -> 'air transport'."""
    parts = readable(subcategory).replace("&", "and").split()
    if len(parts) > 1 and parts[0] in {"animal", "food", "plant", "place"}:
        return " ".join(parts[1:])
    if len(parts) > 1 and parts[0] in {"face", "transport", "hand", "person"}:
        return " ".join(parts[1:] + parts[:1])
    return " ".join(parts)


def emoji_tags(tags: Sequence[str], name: str, limit: int = 4) -> list[str]:
    """emojibase tags that add something to the name (short codes like 'EG' are dropped)."""
    words = set(name.lower().split())
    out = []
    for t in tags:
        t = readable(t)
        if len(t) >= 3 and t not in words and t not in out:
            out.append(t)
    return out[:limit]


def emoji_captions(
    name: str,
    *,
    tone: str = "",
    subcategory: str = "",
    category: str = "",
    alternates: Sequence[str] = (),
    tags: Sequence[str] = (),
    style: str = "",
) -> list[str]:
    """Captions for one emoji image; `tone` is a `tone_phrase`, `style` e.g. 'flat' for Fluent."""
    full = f"{name} {tone}".strip()
    caps = [f"an emoji of {with_article(full)}", f"{full} emoji"]
    if style:
        caps.append(f"a {style} style emoji of {with_article(full)}")
    if subcategory:
        caps.append(f"{full}, {with_article(subcategory)} emoji")
    if category:
        caps.append(
            f"{with_article(full + ' emoji')} from the {readable(category).replace('&', 'and')} category"
        )
    caps += [f"{alt} emoji" for alt in alternates if alt and alt != name]
    if tags:
        caps.append(f"{full}: {', '.join(tags)}")
    return caps


def short_name_alternates(short_names: Sequence[str], name: str) -> list[str]:
    """emoji-datasource short names as readable alternates, without flag codes ('flag-eg') or repeats."""
    out = []
    for s in short_names:
        alt = readable(s)
        if alt.startswith("flag ") or alt == name.lower() or alt in out or not has_enough_letters(alt):
            continue
        out.append(alt)
    return out


def split_fluent_name(icon: str) -> tuple[str, str]:
    """'man-office-worker-medium-dark' -> ('man-office-worker', 'medium-dark'); no tone -> (icon, '')."""
    for tone in _FLUENT_TONES:
        if icon.endswith("-" + tone) and len(icon) > len(tone) + 1:
            return icon[: -len(tone) - 1], tone
    return icon, ""


# --- game-icons ---------------------------------------------------------------------------------------


def game_icon_captions(thing: str) -> list[str]:
    return [
        f"a black silhouette icon of {with_article(thing)}",
        f"{thing} icon",
        f"a silhouette of {with_article(thing)}",
        f"{thing}, a game icon",
    ]


def normalise_concept(text: str) -> str:
    """The key a concept is split on: lower-case words only, so 'Cat-Face' and 'cat face' agree."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def is_class_name(concept: str, max_words: int = 4) -> bool:
    """A concept that reads as a zero-shot class: a few plain words, mostly letters."""
    words = concept.split()
    return (
        0 < len(words) <= max_words
        and has_enough_letters(concept)
        and bool(re.fullmatch(r"[A-Za-z' ]+", concept))
    )
