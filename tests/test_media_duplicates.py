"""Duplicate tiers: the perceptual hash against generated variants, the tier rules, the grouping of a chain,
and a collection's groups labelled same-file / same-photo / similar through the API and the CLI.

The hash threshold under test is the library default, measured by bench/dedup_tiers.py on other images (the
open corpus's held-out drawings and synthetic photos), not on the scenes drawn here."""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, ImageOps
from test_index_store import FakeEncoder

from clipforge.cli import main
from clipforge.data.synthetic import COLORS, SHAPES, draw_shape
from clipforge.index import Collection
from clipforge.media.duplicates import Thresholds, find_duplicates, phash, tier, tiered_groups

H = Thresholds().photo_hamming


def scene(seed: int, size: int = 128) -> Image.Image:
    """Four random shapes in a 2x2 grid on white."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), "white")
    half = size // 2
    for i in range(4):
        shape = draw_shape(rng.choice(list(COLORS)), rng.choice(SHAPES), half, rng)
        img.paste(shape, ((i % 2) * half, (i // 2) * half))
    return img


def reencoded(img: Image.Image, quality: int = 60) -> Image.Image:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def variants(img: Image.Image) -> dict[str, Image.Image]:
    return {
        "re-encoded": reencoded(img),
        "resized": img.resize((img.width * 5 // 8, img.height * 5 // 8), Image.Resampling.BILINEAR),
        "mirrored": ImageOps.mirror(img),
        "colour-shifted": ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.1)).enhance(1.3),
    }


def test_hash_keeps_variants_within_the_threshold_and_different_scenes_beyond_it() -> None:
    scenes = [scene(s) for s in range(100, 112)]
    hashes = [phash(s) for s in scenes]
    for img, h in zip(scenes, hashes):
        for name, v in variants(img).items():
            assert h.distance(phash(v)) <= H, name
    far = [hashes[i].distance(hashes[j]) for i in range(len(hashes)) for j in range(i)]
    assert min(far) > H


def test_mirroring_is_undone_but_other_turns_are_not() -> None:
    img = scene(7)
    assert phash(img).distance(phash(ImageOps.mirror(img))) == 0
    assert phash(img).distance(phash(img.rotate(90))) > H


def test_tier_rules() -> None:
    t = Thresholds(photo_hamming=8, photo_cosine=0.99, similar_cosine=0.9)
    assert tier(True, 0.2, 40, t) == "same-file"
    assert tier(False, 0.5, 8, t) == "same-photo"  # the hash decides whatever the model says
    assert tier(False, 0.995, 30, t) == "same-photo"  # a crop the hash does not survive
    assert tier(False, 0.95, 30, t) == "similar"
    assert tier(False, 0.95, None, t) == "similar"  # no hash (a caption, a video frame)
    assert tier(False, 0.85, 9, t) is None
    assert tier(False, 0.995, None, Thresholds(photo_cosine=None)) == "similar"
    with pytest.raises(ValueError, match="photo_hamming"):
        Thresholds(photo_hamming=64)


def test_a_member_takes_the_weakest_link_of_its_strongest_path() -> None:
    # 0 =same-file= 1 -same-photo- 2 ~similar~ 3, and 2 -same-photo- 4 ; 5 alone with 6 (similar).
    pairs = [
        (0, 1, "same-file"),
        (1, 2, "same-photo"),
        (2, 3, "similar"),
        (2, 4, "same-photo"),
        (5, 6, "similar"),
    ]
    got = tiered_groups(7, pairs)
    assert got == [
        [(0, None), (1, "same-file"), (2, "same-photo"), (3, "similar"), (4, "same-photo")],
        [(5, None), (6, "similar")],
    ]


@pytest.fixture
def library(tmp_path: Path) -> Path:
    """A photo, a byte copy, a re-encode, a mirror; a different scene in the same colours (a similar shot for
    the colour-statistics encoder); an unrelated picture."""
    d = tmp_path / "lib"
    d.mkdir()
    photo = scene(1)
    photo.save(d / "a.png")
    shutil.copy(d / "a.png", d / "a_copy.png")
    reencoded(photo, 80).save(d / "a_reencoded.jpg", quality=95)
    ImageOps.mirror(photo).save(d / "a_mirrored.png")
    photo.transpose(Image.Transpose.ROTATE_90).save(d / "b_other_shot.png")  # same colours, other picture
    Image.new("RGB", (128, 128), (20, 20, 20)).save(d / "c_unrelated.png")
    return d


@pytest.mark.parametrize("partners", [32, 2])  # 2: each member keeps only its two strongest links
def test_collection_groups_are_labelled_by_tier(tmp_path: Path, library: Path, capsys, partners: int) -> None:
    enc = FakeEncoder()
    with Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim) as coll:
        coll.add(library, enc)
        groups = find_duplicates(coll, Thresholds(similar_cosine=0.95), partners=partners)
    assert len(groups) == 1
    got = {Path(m.hit.path).name: m.tier for m in groups[0]}
    assert got == {
        "a.png": None,
        "a_copy.png": "same-file",
        "a_reencoded.jpg": "same-photo",
        "a_mirrored.png": "same-photo",
        "b_other_shot.png": "similar",
    }
    assert main(["dedup", str(tmp_path / "c"), "--threshold", "0.95", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {Path(m["path"]).name: m["tier"] for m in out["groups"][0]} == got
    assert out["thresholds"]["photo_hamming"] == H


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--threshold", "2", "--threshold is a cosine"),
        ("--photo-hamming", "70", "photo_hamming is a number of bits"),
    ],
)
def test_dedup_cli_names_a_bad_threshold(tmp_path: Path, capsys, flag: str, value: str, message: str) -> None:
    from test_index_cli import fail

    enc = FakeEncoder()
    Collection.create(tmp_path / "c", identity=enc.identity, dim=enc.dim).close()
    assert message in fail(capsys, "dedup", tmp_path / "c", flag, value)
