"""The open corpus: caption recipe, licence filter, concept split and image normalisation, all offline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.data import captions as cap
from clipforge.data import corpus, render

SVG_TEMPLATE = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
  xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
  {size}>
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag><rdf:li>hash</rdf:li><rdf:li>fruit</rdf:li><rdf:li>food</rdf:li>
      <rdf:li>clip art</rdf:li><rdf:li>Lemon</rdf:li><rdf:li>yellow</rdf:li></rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
    <dc:creator><cc:Agent><dc:title>Benji Park</dc:title></cc:Agent></dc:creator>
    {license}
  </cc:Work></rdf:RDF></metadata>
  <rect x="20" y="30" width="40" height="20" fill="#c00000"/>
</svg>"""
PD = '<cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>'
GPL = '<cc:license rdf:resource="http://creativecommons.org/licenses/GPL/2.0/"/>'


def make_svg(title: str = "Lemon", license: str = PD, size: str = 'width="100" height="100"') -> str:
    return SVG_TEMPLATE.format(title=title, license=license, size=size)


# --- captions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("cat", "a cat"),
        ("owl", "an owl"),
        ("hour glass", "an hour glass"),
        ("unicorn face", "a unicorn face"),
        ("umbrella", "an umbrella"),
        ("one piece swimsuit", "a one piece swimsuit"),
        ("8 ball", "an 8 ball"),
        ("chopsticks", "chopsticks"),
        ("people holding hands", "people holding hands"),
        ("glass of milk", "a glass of milk"),
        ("dress", "a dress"),
    ],
)
def test_with_article(phrase: str, expected: str) -> None:
    assert cap.with_article(phrase) == expected


def test_svg_metadata_and_openclipart_captions() -> None:
    meta = cap.parse_svg_metadata(make_svg(title="Cartoon Squirrel"))
    # The publisher's and creator's <dc:title> must not be mistaken for the work's title.
    assert meta == cap.SvgMeta(
        title="Cartoon Squirrel",
        creator="Benji Park",
        subjects=("hash", "fruit", "food", "clip art", "Lemon", "yellow"),
        license="http://web.resource.org/cc/PublicDomain",
    )
    thing = cap.title_thing(meta.title, title_count=1)
    kws = cap.keywords(meta.subjects, exclude=[thing, meta.creator, "fruit"])
    assert cap.keywords(["hash(0x874e7bc)", "bw", "Lock"]) == ["lock"]
    assert kws == ["food", "lemon", "yellow"]  # noise ("hash", "clip art") and the category removed
    assert cap.openclipart_captions(thing, "mammals", kws) == [
        "a clip art drawing of a cartoon squirrel",
        "cartoon squirrel, clip art",
        "cartoon squirrel, clip art from the mammals category",
        "cartoon squirrel: food, lemon, yellow",
    ]


def test_collection_titles_fall_back_to_file_name() -> None:
    for title in [
        "gramastar",
        "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)",
        "Lemon SVG theme",
        "card",
    ]:
        assert cap.is_collection_title(title), title
        assert cap.title_thing(title, title_count=1) == ""
    assert cap.title_thing("Pink-Rose", title_count=1) == "pink rose"
    assert cap.title_thing("guitar1", title_count=1) == "guitar"
    assert cap.title_thing("Bicycle", title_count=4) == ""  # shared by many files: a collection name
    assert cap.title_thing("Clipart by Nicu Buculei - compact_disc", title_count=1) == "compact disc"
    assert cap.filename_thing("pencil_benji_park_01", "Benji Park") == "pencil"
    assert cap.filename_thing("left_foot_print_benji_pa_02", "Benji Park") == "left foot print"
    assert cap.filename_thing("coniglio_architetto_fran_01", "Architetto Francesco Rollandin") == "coniglio"
    assert cap.filename_thing("paperbag1_juliane_krug", "Juliane Krug") == "paperbag"
    assert cap.filename_thing("crawfish1_bw", "Someone Else") == "crawfish bw"
    assert cap.filename_thing("elephant_outline_matthe_r", "Matthew Loewen") == "elephant outline"
    assert cap.filename_thing("sm_004", "Nicu Buculei") == "sm"
    assert not cap.has_enough_letters("sm")
    assert cap.category_from_path("food/fruit") == "fruit"
    assert cap.category_from_path("recreation/games/cards/simple") == "cards"


def test_licence_filter_keeps_public_domain_only() -> None:
    assert cap.is_public_domain(cap.parse_svg_metadata(make_svg()).license)
    assert not cap.is_public_domain(cap.parse_svg_metadata(make_svg(license=GPL)).license)
    assert not cap.is_public_domain(cap.parse_svg_metadata(make_svg(license="")).license)


def test_openclipart_items_filters_licence_folders_and_titles(tmp_path: Path) -> None:
    files = {
        "food/fruit/lemon_benji_park_01.svg": make_svg(title="Lemon SVG theme"),
        "food/fruit/gpl_thing.svg": make_svg(title="Pear", license=GPL),
        "food/fruit/nolicence.svg": make_svg(title="Plum", license=""),
        "shapes/stars/star_1.svg": make_svg(title="Star"),
        "animals/owl.svg": make_svg(title="Wise Owl"),
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    skips = corpus.Skips()
    items = corpus.openclipart_items(tmp_path, seed=0, skips=skips)
    assert [(it.id, it.concept, it.classable) for it in items] == [
        ("animals__owl", "wise owl", True),
        ("food__fruit__lemon_benji_park_01", "lemon", False),  # name from the file, not a class name
    ]
    assert items[1].captions[2] == "lemon, clip art from the fruit category"
    assert sum(skips.counts.values()) == 3
    assert skips.counts["openclipart: excluded folder shapes/stars"] == 1
    assert skips.counts["openclipart: licence unstated is not public domain"] == 1


def test_emoji_captions_with_skin_tone_and_flag() -> None:
    entry = {"name": "FATHER CHRISTMAS", "short_names": ["santa"], "subcategory": "person-fantasy"}
    name = cap.emoji_name("Santa Claus")
    alts = [cap.emoji_name(entry["name"]).lower()] + cap.short_name_alternates(entry["short_names"], name)
    caps = cap.emoji_captions(
        name,
        tone=cap.tone_phrase("1F3FC"),
        subcategory=cap.subcategory_name(entry["subcategory"]),
        category="People & Body",
        alternates=alts,
        tags=cap.emoji_tags(["christmas", "santa", "claus", "xmas", "EG"], name),
    )
    assert caps == [
        "an emoji of a santa claus with medium-light skin tone",
        "santa claus with medium-light skin tone emoji",
        "santa claus with medium-light skin tone, a fantasy person emoji",
        "a santa claus with medium-light skin tone emoji from the people and body category",
        "father christmas emoji",
        "santa emoji",
        "santa claus with medium-light skin tone: christmas, xmas",
    ]
    assert cap.emoji_name("Egypt Flag") == "flag of Egypt"
    assert cap.emoji_name("flag: Egypt") == "flag of Egypt"
    assert cap.emoji_name("GRINNING FACE WITH SMILING EYES") == "grinning face with smiling eyes"
    assert cap.emoji_name("woman: beard") == "woman with beard"
    assert cap.emoji_name("kiss: woman, man") == "kiss of woman and man"
    assert cap.emoji_name("keycap: #") == "keycap #"
    assert cap.short_name_alternates(["flag-eg"], "flag of Egypt") == []
    assert cap.subcategory_name("face-smiling") == "smiling face"
    assert cap.subcategory_name("animal-mammal") == "mammal"
    assert cap.tone_phrase("1F3FB-1F3FF") == "with light and dark skin tones"
    assert cap.hex_key("0023-fe0f-20e3") == "0023-20E3"
    with pytest.raises(ValueError, match="1F600"):
        cap.tone_phrase("1F600")


def test_emoji_datasource_items_join_emojibase(tmp_path: Path) -> None:
    pkg = tmp_path / "package"
    (pkg / "img/google/64").mkdir(parents=True)
    entry = {
        "name": "FATHER CHRISTMAS", "unified": "1F385", "image": "1f385.png", "short_names": ["santa"],
        "category": "People & Body", "subcategory": "person-fantasy", "sort_order": 1, "has_img_google": True,
        "skin_variations": {"1F3FF": {"image": "1f385-1f3ff.png", "has_img_google": True},
                            "1F3FB": {"image": "1f385-1f3fb.png", "has_img_google": False}},
    }  # fmt: skip
    (pkg / "emoji.json").write_text(json.dumps([entry]))
    for name in ("1f385.png", "1f385-1f3ff.png"):
        Image.new("RGBA", (64, 64)).save(pkg / "img/google/64" / name)
    skips = corpus.Skips()
    base = {"1F385": ("Santa Claus", ["christmas"])}
    items = corpus.emoji_datasource_items(pkg, "noto", base, skips)
    assert [(it.id, it.concept) for it in items] == [("1f385", "santa claus"), ("1f385-1f3ff", "santa claus")]
    assert items[1].captions[0] == "an emoji of a santa claus with dark skin tone"
    assert skips.counts == {"noto: no image in this set": 1}


def test_fluent_and_game_icon_names() -> None:
    assert cap.split_fluent_name("man-office-worker-medium-dark") == ("man-office-worker", "medium-dark")
    assert cap.split_fluent_name("man-office-worker-light") == ("man-office-worker", "light")
    assert cap.split_fluent_name("snow-capped-mountain") == ("snow-capped-mountain", "")
    assert cap.clean_name("snow-capped-mountain") == "snow capped mountain"
    assert (
        cap.game_icon_captions(cap.clean_name("claw-hammer"))[0] == "a black silhouette icon of a claw hammer"
    )
    assert cap.game_icon_captions(cap.clean_name("axe-in-stump"))[1] == "axe in stump icon"
    assert cap.clean_name("abstract-001") == "abstract"
    assert cap.is_class_name("cat face") and cap.is_class_name("flag of Egypt")
    assert not cap.is_class_name("keycap #") and not cap.is_class_name("a very long name of five words")


def test_iconify_svg_renders_and_flips() -> None:
    icons = {
        "width": 32,
        "height": 32,
        "icons": {"left": {"body": '<rect x="0" y="8" width="8" height="16" fill="#000"/>'}},
        "aliases": {"right": {"parent": "left", "hFlip": True}, "typo": {"parent": "left"}},
    }
    skips = corpus.Skips()
    assert corpus._iconify_names(icons, skips, "x") == ["left", "right"]
    left, right = (
        render.render_svg(corpus._iconify_svg(icons, n), 8, long_side=32) for n in ("left", "right")
    )
    a_left, a_right = np.asarray(left)[..., 3], np.asarray(right)[..., 3]
    assert a_left[16, 2] == 255 and a_left[16, 30] == 0
    np.testing.assert_array_equal(a_right, a_left[:, ::-1])  # the alias is the mirror image


# --- split --------------------------------------------------------------------------------------------


def _items(concepts: list[str]) -> list[corpus.CorpusItem]:
    return [
        corpus.CorpusItem(s, f"{i}", c, [c], "png", "")
        for i, c in enumerate(concepts)
        for s in ("noto", "fluent")
    ]


def test_split_is_by_concept_deterministic_and_near_fraction() -> None:
    concepts = [f"concept number {i}" for i in range(2000)]
    items = _items(concepts) + _items(["Cat-Face"]) + _items(["cat face"])
    train, held = corpus.split_by_concept(items, 0.1, seed=0)
    train_c = {cap.normalise_concept(it.concept) for it in train}
    held_c = {cap.normalise_concept(it.concept) for it in held}
    assert not train_c & held_c  # no concept on both sides (spelling variants included)
    assert 0.08 < len(held_c) / len(train_c | held_c) < 0.12
    again = corpus.split_by_concept(items, 0.1, seed=0)
    assert [it.concept for it in again[1]] == [it.concept for it in held]
    other = corpus.split_by_concept(items, 0.1, seed=1)[1]
    assert {it.concept for it in other} != {it.concept for it in held}


# --- images -------------------------------------------------------------------------------------------


def test_normalize_image_centres_content_on_white_square() -> None:
    img = Image.new("RGBA", (200, 100), (0, 0, 0, 0))  # transparent background
    img.paste((0, 0, 255, 255), (10, 20, 50, 60))  # a 40x40 blue square off-centre
    out = render.normalize_image(img, 64, margin=0.25)
    a = np.asarray(out).astype(int)
    assert out.mode == "RGB" and out.size == (64, 64)
    # 40 px of content + 2 * 25% margin = 60 px side: content spans 64 * 40/60 = 42.7 px, centred.
    blue = (a[..., 2] > 200) & (a[..., 0] < 60)
    ys, xs = np.nonzero(blue)
    assert abs((ys.min() + ys.max()) / 2 - 31.5) <= 1 and abs((xs.min() + xs.max()) / 2 - 31.5) <= 1
    assert abs((xs.max() - xs.min() + 1) - 42.7) <= 2
    np.testing.assert_array_equal(a[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(a[32, 32], [0, 0, 255])
    with pytest.raises(render.RenderError, match="blank"):
        render.normalize_image(Image.new("RGBA", (8, 8)), 16)


def test_pt_and_mm_svg_sizes_are_restated_and_render() -> None:
    import resvg_py

    svg = make_svg(size='width="75pt" height="75pt"')
    with pytest.raises(ValueError):
        resvg_py.svg_to_bytes(svg_string=svg, width=64)  # the trap: resvg rejects the unit size
    fixed = render.fix_svg_size(svg)
    assert 'width="93.750"' in fixed and 'viewBox="0 0 93.750 93.750"' in fixed
    img = render.render_svg(svg, 32, long_side=375)  # 4x the 93.75 px page
    assert img.size == (375, 375)
    # The 40x20 red rectangle at (20, 30) in user units, scaled by 4.
    solid = img.getchannel("A").point(lambda v: 255 if v > 127 else 0)  # ignore anti-aliased edges
    np.testing.assert_allclose(solid.getbbox(), (80, 120, 240, 200), atol=1)
    mm = render.fix_svg_size(make_svg(size='width="210mm" height="297mm"'))
    assert 'viewBox="0 0 744.094 1052.362"' in mm
    assert render._svg_aspect(mm) == pytest.approx(210 / 297)
    # Unit sizes next to a viewBox are rejected too: restate them, keep the viewBox.
    inch = render.fix_svg_size(make_svg(size='width="1in" height="2in" viewBox="0 0 100 100"'))
    assert 'width="90.000" height="180.000" viewBox="0 0 100 100"' in inch
    assert render.render_svg(inch, 8, long_side=64).size == (32, 64)


def test_render_task_writes_png_and_reports_failures(tmp_path: Path) -> None:
    out = tmp_path / "a.png"
    assert render.render_task(("x/a", "svg_text", make_svg(), str(out), 32)) == ("x/a", "")
    img = Image.open(out)
    assert img.size == (32, 32) and img.mode == "RGB"
    key, err = render.render_task(("x/b", "svg_text", "<svg", str(tmp_path / "b.png"), 32))
    assert key == "x/b" and err.startswith("ValueError") and not (tmp_path / "b.png").exists()
    big = tmp_path / "big.png"
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    big.write_bytes(buf.getvalue())
    with pytest.raises(render.RenderError, match="over 1000 pixels"):
        render.load_png(str(big), max_pixels=1000)


def test_fetch_corpus_rejects_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(corpus.CorpusError, match="apple"):
        corpus.fetch_corpus(tmp_path, corpus.CorpusConfig(sources=("apple",)), progress=False)
