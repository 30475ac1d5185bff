"""The open corpus clipforge's default model trains on: fetch, render, caption and split.

Sources (all openly licensed, fetched with ordinary package clients, see OPEN-CORPUS.md): Open Clip Art
(Debian `openclipart-svg`, public domain), Noto and Twemoji emoji (npm `emoji-datasource-*`), Fluent Emoji
Flat and game-icons.net (npm `@iconify-json/*`), with emojibase tags for richer emoji captions.

    downloads/        .deb / .tgz and their unpacked trees (re-used by later calls)
    images/<source>/<id>.png      RGB on white, square, image_size (rendered once)
    train.jsonl, heldout.jsonl    {"image", "captions", "source", "license", "concept"}
    heldout_zeroshot.jsonl, heldout_retrieval.jsonl, ATTRIBUTION.md, corpus.json
    heldout_relevance.jsonl       the held-out rows of the concepts that fit relevance calibrations

The held-out split is by concept, so the same thing drawn by several sources is on one side only.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import subprocess
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipforge.atomic import atomic_path
from clipforge.data import captions as cap
from clipforge.data.render import render_task
from clipforge.paths import corpus_dir

SOURCES = ("openclipart", "noto", "twemoji", "fluent", "game-icons")
LICENSES = {
    "openclipart": "public-domain",
    "noto": "Apache-2.0",
    "twemoji": "CC-BY-4.0",
    "fluent": "MIT",
    "game-icons": "CC-BY-3.0",
}
# Pinned so the default model's figures stay comparable from one clipforge version to the next.
NPM_PACKAGES = {
    "noto": "emoji-datasource-google@16.0.0",
    "twemoji": "emoji-datasource-twitter@16.0.0",
    "fluent": "@iconify-json/fluent-emoji-flat@1.2.6",
    "game-icons": "@iconify-json/game-icons@1.2.4",
    "emojibase": "emojibase-data@17.0.0",
}
DEB_PACKAGE = "openclipart-svg"
EXCLUDED_DIRS = ("shapes/stars", "special/gradients", "special/patterns")
DOWNWEIGHTED_DIR, DOWNWEIGHT_KEEP = "computer/icons", 4  # keep 1 in 4 desktop icons


class CorpusError(ValueError):
    """A download, package layout or input the corpus builder cannot use."""


@dataclass(frozen=True)
class CorpusConfig:
    image_size: int = 128
    sources: tuple[str, ...] = SOURCES
    heldout_fraction: float = 0.1
    seed: int = 0
    workers: int = 2


@dataclass
class CorpusItem:
    source: str
    id: str
    concept: str
    captions: list[str]
    kind: str  # "svg_file", "svg_text" or "png": what `src` holds
    src: str
    classable: bool = True  # concept reads as a zero-shot class name

    @property
    def image(self) -> str:
        return f"images/{self.source}/{self.id}.png"


@dataclass
class Skips:
    """Why items were left out: a count per reason and the first few ids."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, reason: str, ident: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(ident)


# --- downloads ----------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_deb(downloads: Path, package: str = DEB_PACKAGE) -> Path:
    """`apt-get download` + `dpkg-deb -x` (no root needed); returns the unpacked root."""
    debs, root = downloads / "debs", downloads / "root"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        if _run(["apt-get", "download", package], debs).returncode != 0:
            _run(["apt-get", "update"], debs)  # a bare machine may have no package lists yet
            res = _run(["apt-get", "download", package], debs)
            if res.returncode != 0:
                raise CorpusError(f"apt-get download {package} failed: {res.stderr.strip()[-500:]}")
        found = sorted(debs.glob(f"{package}_*.deb"))
    marker = root / f".unpacked-{found[-1].name}"
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        res = _run(["dpkg-deb", "-x", str(found[-1]), str(root)], debs)
        if res.returncode != 0:
            raise CorpusError(f"dpkg-deb -x {found[-1].name} failed: {res.stderr.strip()}")
        marker.touch()
    return root


def fetch_npm(downloads: Path, spec: str) -> Path:
    """`npm pack name@version` and unpack it; returns the package folder (the tarball's `package/`)."""
    npm = downloads / "npm"
    npm.mkdir(parents=True, exist_ok=True)
    name, version = spec.rsplit("@", 1)
    stem = f"{name.lstrip('@').replace('/', '-')}-{version}"
    tgz, out = npm / f"{stem}.tgz", npm / stem
    if not tgz.exists():
        res = _run(["npm", "pack", spec], npm)
        if res.returncode != 0 or not tgz.exists():
            raise CorpusError(f"npm pack {spec} failed: {res.stderr.strip()[-500:]}")
    if not (out / ".unpacked").exists():
        shutil.rmtree(out, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(out, filter="data")
        (out / ".unpacked").touch()
    return out / "package"


# --- sources: package trees -> items ------------------------------------------------------------------


def _hash_unit(*parts: object) -> float:
    """A stable number in [0, 1) from the parts (Python's hash() changes between runs)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def openclipart_items(svg_root: Path, seed: int, skips: Skips) -> list[CorpusItem]:
    """Public-domain Open Clip Art drawings with a usable name, minus the excluded and down-weighted folders."""
    files = sorted(p for p in svg_root.rglob("*.svg"))
    metas: dict[Path, cap.SvgMeta] = {}
    seen: set[str] = set()
    for path in files:
        rel = path.relative_to(svg_root).as_posix()
        if path.is_symlink():
            skips.add("openclipart: symlink to another file", rel)
            continue
        data = path.read_bytes()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            skips.add("openclipart: same bytes as another file", rel)
            continue
        seen.add(digest)
        metas[path] = cap.parse_svg_metadata(data.decode("utf-8", errors="replace"))
    title_count = Counter(m.title for m in metas.values())
    items = []
    for path, meta in metas.items():
        rel = path.relative_to(svg_root).as_posix()
        item = _openclipart_item(rel, path, meta, title_count[meta.title], seed, skips)
        if item is not None:
            items.append(item)
    return items


def _openclipart_item(
    rel: str, path: Path, meta: cap.SvgMeta, shared: int, seed: int, skips: Skips
) -> CorpusItem | None:
    folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
    if folder.startswith(EXCLUDED_DIRS):
        skips.add(f"openclipart: excluded folder {folder.split('/')[0]}/{folder.split('/')[1]}", rel)
        return None
    if not cap.is_public_domain(meta.license):
        skips.add(f"openclipart: licence {meta.license or 'unstated'} is not public domain", rel)
        return None
    icons = folder.startswith(DOWNWEIGHTED_DIR)
    if icons and _hash_unit(seed, "downweight", rel) >= 1 / DOWNWEIGHT_KEEP:
        skips.add(f"openclipart: {DOWNWEIGHTED_DIR} down-weighted to 1/{DOWNWEIGHT_KEEP}", rel)
        return None
    thing = cap.title_thing(meta.title, shared)
    from_title = bool(thing)
    if not thing:
        thing = cap.filename_thing(path.stem, meta.creator)
    if not cap.has_enough_letters(thing):
        skips.add("openclipart: no usable name (collection title and bare file name)", rel)
        return None
    category = cap.category_from_path(folder)
    kws = cap.keywords(meta.subjects, exclude=[thing, meta.creator, category])
    ident = re.sub(r"[^A-Za-z0-9._-]+", "_", rel[: -len(".svg")].replace("/", "__"))
    return CorpusItem(
        source="openclipart",
        id=ident,
        concept=thing,
        captions=cap.openclipart_captions(thing, category, kws),
        kind="svg_file",
        src=str(path),
        classable=from_title and not icons and cap.is_class_name(thing),
    )


def emojibase_index(pkg: Path, locale: str = "en") -> dict[str, tuple[str, list[str]]]:
    """hex_key -> (CLDR label, tags) from emojibase-data's data for one locale (English by default)."""
    data = json.loads((pkg / locale / "data.json").read_text("utf-8"))
    return {cap.hex_key(e["hexcode"]): (e["label"], e.get("tags") or []) for e in data}


def emoji_datasource_items(pkg: Path, source: str, base: dict, skips: Skips) -> list[CorpusItem]:
    """Noto or Twemoji: one item per emoji and per skin-tone variant that has an image in this set."""
    vendor = {"noto": "google", "twemoji": "twitter"}[source]
    img_dir = pkg / "img" / vendor / "64"
    entries = sorted(json.loads((pkg / "emoji.json").read_text("utf-8")), key=lambda e: e["sort_order"])
    items = []
    for e in entries:
        if e["category"] == "Component":  # skin-tone swatches and hair parts, not pictures of things
            skips.add(f"{source}: component, not a picture", e["image"])
            continue
        label, tags = base.get(cap.hex_key(e["unified"]), (e["name"], []))
        name = cap.emoji_name(label)
        own = cap.emoji_name(e["name"]).lower()
        alternates = ([own] if own != name.lower() else []) + cap.short_name_alternates(
            e["short_names"], name
        )
        common = dict(
            subcategory=cap.subcategory_name(e["subcategory"]),
            category=e["category"],
            alternates=alternates[:2],
            tags=cap.emoji_tags(tags, name),
        )
        variants = [("", e)] + sorted((e.get("skin_variations") or {}).items())
        for tone_key, v in variants:
            path = img_dir / v["image"]
            if not v.get(f"has_img_{vendor}") or not path.exists():
                skips.add(f"{source}: no image in this set", v["image"])
                continue
            tone = cap.tone_phrase(tone_key) if tone_key else ""
            items.append(
                CorpusItem(
                    source, path.stem, name, cap.emoji_captions(name, tone=tone, **common), "png", str(path)
                )
            )
    return items


def _iconify_svg(icons: dict, name: str) -> str | None:
    """A standalone SVG for one iconify icon (aliases that flip their parent included), None if unknown."""
    entry, flip = icons["icons"].get(name), False
    if entry is None:
        alias = icons.get("aliases", {}).get(name)
        if not alias or set(alias) - {"parent", "hFlip"} or alias["parent"] not in icons["icons"]:
            return None
        entry, flip = icons["icons"][alias["parent"]], bool(alias.get("hFlip"))
    w, h = entry.get("width", icons.get("width", 16)), entry.get("height", icons.get("height", 16))
    left, top = entry.get("left", 0), entry.get("top", 0)
    body = entry["body"]
    if flip:
        body = f'<g transform="translate({2 * left + w} 0) scale(-1 1)">{body}</g>'
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{left} {top} {w} {h}">{body}</svg>'


def _iconify_names(icons: dict, skips: Skips, source: str) -> list[str]:
    names = sorted(icons["icons"])
    for alias, spec in sorted(icons.get("aliases", {}).items()):
        if spec.get("hFlip") and set(spec) <= {"parent", "hFlip"}:
            names.append(alias)
        else:
            skips.add(f"{source}: alias repeating another icon", alias)
    return sorted(names)


def fluent_items(pkg: Path, base: dict, skips: Skips) -> list[CorpusItem]:
    """Fluent Emoji Flat: name with an optional skin-tone suffix, CLDR concept joined through chars.json."""
    icons = json.loads((pkg / "icons.json").read_text("utf-8"))
    hex_of = {n: cap.hex_key(h) for h, n in json.loads((pkg / "chars.json").read_text("utf-8")).items()}
    category_of = {
        n: c
        for c, names in json.loads((pkg / "metadata.json").read_text("utf-8"))["categories"].items()
        for n in names
    }
    items = []
    for icon in _iconify_names(icons, skips, "fluent"):
        stem, tone_name = cap.split_fluent_name(icon)
        own = cap.clean_name(stem)
        label, tags = base.get(hex_of.get(stem, ""), ("", []))
        name = cap.emoji_name(label) if label else own
        tone = f"with {tone_name} skin tone" if tone_name else ""
        captions = cap.emoji_captions(
            name,
            tone=tone,
            category=category_of.get(stem, ""),
            alternates=[own] if own != name.lower() else [],
            tags=cap.emoji_tags(tags, name),
            style="flat",
        )
        items.append(CorpusItem("fluent", icon, name, captions, "svg_text", _iconify_svg(icons, icon) or ""))
    return items


def game_icon_items(pkg: Path, skips: Skips) -> list[CorpusItem]:
    """game-icons.net silhouettes, captioned from their descriptive names."""
    icons = json.loads((pkg / "icons.json").read_text("utf-8"))
    items = []
    for icon in _iconify_names(icons, skips, "game-icons"):
        thing = re.sub(r"( alt)+$", "", cap.clean_name(icon))  # 'battery-pack-alt' is another battery pack
        if not cap.has_enough_letters(thing) or thing == "abstract":
            skips.add("game-icons: name says nothing about the picture", icon)
            continue
        svg = _iconify_svg(icons, icon) or ""
        items.append(CorpusItem("game-icons", icon, thing, cap.game_icon_captions(thing), "svg_text", svg))
    return items


# --- split and outputs --------------------------------------------------------------------------------


def concept_in_heldout(concept: str, fraction: float, seed: int) -> bool:
    """Held out iff the seeded hash of the normalised concept falls under `fraction`."""
    return _hash_unit(seed, "split", cap.normalise_concept(concept)) < fraction


def fits_relevance(concept: str, seed: int) -> bool:
    """Whether a held-out concept is in the half that fits relevance calibrations (`clipforge index
    calibrate`); the other half measures them (bench/search_quality.py), so the measure is of unseen concepts."""
    return _hash_unit(seed, "relevance", cap.normalise_concept(concept)) < 0.5


def split_by_concept(
    items: list[CorpusItem], fraction: float, seed: int
) -> tuple[list[CorpusItem], list[CorpusItem]]:
    train, heldout = [], []
    for it in items:
        (heldout if concept_in_heldout(it.concept, fraction, seed) else train).append(it)
    return train, heldout


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _row(it: CorpusItem) -> dict:
    return {
        "image": it.image,
        "captions": it.captions,
        "source": it.source,
        "license": LICENSES[it.source],
        "concept": it.concept,
    }


ATTRIBUTION = """# Attribution for the clipforge open corpus

The images in this corpus come from openly licensed packages. A model trained on it should carry the
CC BY credits below.

| source | package | licence | credit |
| --- | --- | --- | --- |
| Open Clip Art Library 0.18 | Debian `openclipart-svg` | public domain (per-file `cc:license`; others dropped) | the Open Clip Art Library contributors |
| Noto Color Emoji | npm `{noto}` | Apache-2.0 | Google |
| Twemoji | npm `{twemoji}` | CC BY 4.0 | Twemoji by Twitter, Inc and other contributors |
| Fluent Emoji (flat) | npm `{fluent}` | MIT | Microsoft (Fluent UI Emoji) |
| game-icons.net | npm `{game-icons}` | CC BY 3.0 | the game-icons.net authors (Lorc, Delapouite and contributors) |
| emojibase (text only: labels, tags) | npm `{emojibase}` | MIT | emojibase |

Twemoji graphics (c) Twitter, Inc and other contributors, licensed under CC BY 4.0.
Game icons by the authors credited at game-icons.net, licensed under CC BY 3.0.
Captions were written by clipforge from the packages' names and metadata.
Models whose towers start from pretrained weights also owe the credits in ../towers/ATTRIBUTION.md
(written by `clipforge data fetch-towers`).
"""


def _gather_items(downloads: Path, cfg: CorpusConfig, skips: Skips, packages: dict) -> list[CorpusItem]:
    items: list[CorpusItem] = []
    emoji_sources = {"noto", "twemoji", "fluent"} & set(cfg.sources)
    base = emojibase_index(fetch_npm(downloads, NPM_PACKAGES["emojibase"])) if emoji_sources else {}
    for source in cfg.sources:
        if source == "openclipart":
            root = fetch_deb(downloads)
            packages["openclipart"] = sorted((downloads / "debs").glob(f"{DEB_PACKAGE}_*.deb"))[-1].name
            items += openclipart_items(root / "usr/share/openclipart/svg", cfg.seed, skips)
            continue
        pkg = fetch_npm(downloads, NPM_PACKAGES[source])
        packages[source] = NPM_PACKAGES[source]
        if source in ("noto", "twemoji"):
            items += emoji_datasource_items(pkg, source, base, skips)
        elif source == "fluent":
            items += fluent_items(pkg, base, skips)
        else:
            items += game_icon_items(pkg, skips)
    return items


def _render_all(items: list[CorpusItem], out: Path, cfg: CorpusConfig, progress: bool) -> dict[str, str]:
    """Render what is not cached yet; returns id -> failure reason for every item that has no image."""
    images = out / "images"
    state_path = images / "render.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("image_size") != cfg.image_size:
        shutil.rmtree(images, ignore_errors=True)  # rendered at another size: start over
        state = {"image_size": cfg.image_size, "failures": {}}
    failures: dict[str, str] = state["failures"]
    todo = []
    for it in items:
        key = f"{it.source}/{it.id}"
        if key not in failures and not (out / it.image).exists():
            (out / it.image).parent.mkdir(parents=True, exist_ok=True)
            todo.append((key, it.kind, it.src, str(out / it.image), cfg.image_size))
    if todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="rendering", unit="img", disable=not progress)
        if cfg.workers > 1:
            with multiprocessing.get_context("fork").Pool(cfg.workers) as pool:
                results = pool.imap_unordered(render_task, todo, chunksize=16)
                for key, err in results:
                    failures.update({key: err} if err else {})
                    bar.update()
        else:
            for task in todo:
                key, err = render_task(task)
                failures.update({key: err} if err else {})
                bar.update()
        bar.close()
        state_path.write_text(json.dumps(state, indent=1, sort_keys=True))
    return failures


def _summary(
    cfg: CorpusConfig, train: list[CorpusItem], heldout: list[CorpusItem], skips: Skips, packages: dict
) -> dict:
    counts = {
        s: {"train": sum(it.source == s for it in train), "heldout": sum(it.source == s for it in heldout)}
        for s in cfg.sources
    }
    return {
        "config": asdict(cfg),
        "packages": packages,
        "counts": counts,
        "total": {"train": len(train), "heldout": len(heldout)},
        "concepts": {
            "train": len({cap.normalise_concept(it.concept) for it in train}),
            "heldout": len({cap.normalise_concept(it.concept) for it in heldout}),
        },
        "skipped": dict(sorted(skips.counts.items())),
        "skipped_examples": dict(sorted(skips.examples.items())),
    }


def fetch_corpus(
    out_dir: Path | None = None, cfg: CorpusConfig = CorpusConfig(), progress: bool = True
) -> Path:
    """Download, render, caption and split the open corpus into `out_dir`; returns that folder.

    Downloads and rendered images are cached, so a second call is fast and writes the same files.
    """
    unknown = sorted(set(cfg.sources) - set(SOURCES))
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {unknown}; valid: {list(SOURCES)}")
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise CorpusError(f"heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    out = Path(out_dir) if out_dir is not None else corpus_dir()
    downloads = out / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    start, skips, packages = time.time(), Skips(), {}
    items = _gather_items(downloads, cfg, skips, packages)
    failures = _render_all(items, out, cfg, progress)
    kept = []
    for it in items:
        err = failures.get(f"{it.source}/{it.id}")
        if err:
            skips.add(f"{it.source}: render failed", f"{it.id} ({err})")
        else:
            kept.append(it)
    train, heldout = split_by_concept(kept, cfg.heldout_fraction, cfg.seed)
    _write_jsonl(out / "train.jsonl", [_row(it) for it in train])
    _write_jsonl(out / "heldout.jsonl", [_row(it) for it in heldout])
    _write_jsonl(
        out / "heldout_zeroshot.jsonl",
        [
            {"image": it.image, "label": it.concept}
            for it in heldout
            if it.classable and cap.is_class_name(it.concept)
        ],
    )
    _write_jsonl(
        out / "heldout_retrieval.jsonl", [{"image": it.image, "caption": it.captions} for it in heldout]
    )
    _write_jsonl(
        out / "heldout_relevance.jsonl", [_row(it) for it in heldout if fits_relevance(it.concept, cfg.seed)]
    )
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(**NPM_PACKAGES))
    summary = _summary(cfg, train, heldout, skips, packages)
    (out / "corpus.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    if progress:
        print(f"corpus: {len(train)} train, {len(heldout)} held out in {out} ({time.time() - start:.0f} s)")
    return out
