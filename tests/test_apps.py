"""Applications on a model trained on synthetic shapes in this session: tagging and moderation calibrated to
a target on held-out images, CLIP score definitions and its pixel gradient, ranking, and explanation maps
that find the right quadrant."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clipforge.apps.calibration import precision_recall, threshold_for_precision, threshold_for_recall
from clipforge.apps.explain import explain, save_overlay
from clipforge.apps.moderation import Moderator, PolicyError, load_policy, parse_policy, policy_texts
from clipforge.apps.rank import rank_images, rank_texts
from clipforge.apps.score import clip_score, guidance_loss, pair_similarity, pixel_similarity, ref_clip_score
from clipforge.apps.tagging import Tagger
from clipforge.cli import main
from clipforge.data.synthetic import COLORS, SHAPES, shape_samples, write_shapes
from clipforge.zeroshot import label_prompts


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Cached classifiers go to a per-test directory, never the user's cache.
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))


LABELS = [f"{c} {s}" for c in COLORS for s in SHAPES]
EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "moderation-policy.yaml"


def test_threshold_helpers_exact():
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 1, 0, 1, 0, 0], bool)
    assert threshold_for_precision(s, y, 1.0) == 0.8
    assert threshold_for_precision(s, y, 0.75) == 0.6  # 3 of the top 4
    assert threshold_for_recall(s, y, 2 / 3) == 0.8
    assert threshold_for_recall(s, y, 1.0) == 0.6
    assert precision_recall(s, y, 0.6) == (0.75, 1.0)
    assert threshold_for_precision(s, np.zeros(6, bool), 0.9) is None


def _manifest(tmp_path, n, seed, extra):
    m = write_shapes(tmp_path / f"set{seed}", n, size=32, seed=seed)
    rows = [json.loads(x) for x in m.read_text().splitlines()]
    m.write_text("\n".join(json.dumps({**r, **extra(r)}) for r in rows) + "\n")
    return m, rows


def _tag_hits(tagger: Tagger, test, rows) -> tuple[int, int]:
    """(right tags, tags emitted) on a held-out manifest whose one right tag per image is its label."""
    tags = tagger.tag([str(test.parent / r["image"]) for r in rows])
    return sum(t == r["label"] for ts, r in zip(tags, rows) for t, _ in ts), sum(len(ts) for ts in tags)


def test_tag_calibration_reaches_target_precision_on_held_out(shapes_encoder, tmp_path):
    # Thresholds are fitted on one set of images and judged only on another.
    tagger = Tagger(shapes_encoder, LABELS, templates="simple")
    test, rows = _manifest(tmp_path, 24 * 8, 12, lambda r: {"tags": [r["label"]]})
    tp0, emitted0 = _tag_hits(tagger, test, rows)  # the uncalibrated default threshold, for comparison
    cal, _ = _manifest(tmp_path, 24 * 8, 11, lambda r: {"tags": [r["label"]]})
    tagger.calibrate(cal, precision=0.9)
    tp, emitted = _tag_hits(tagger, test, rows)
    assert tp / max(emitted, 1) >= 0.8, (tp, emitted)  # the 0.9 target, less sampling noise on 192 images
    # Calibration chose a more useful operating point than the default: more right tags at that precision
    # (measured: 0.03 recall uncalibrated, ~0.2-0.3 calibrated).
    assert tp > max(tp0, 0.15 * len(rows)), (tp0, emitted0, tp, emitted)


def test_tag_thresholds_file_validation(shapes_encoder, tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"kind": "clipforge-tag-thresholds", "default": 0.5, "tags": {"unicorn": 0.3}}))
    with pytest.raises(ValueError, match="unicorn"):
        Tagger(shapes_encoder, LABELS, thresholds=bad)


RED_POLICY = {
    "neutral": [f"a {c} {s}" for c in COLORS if c != "red" for s in SHAPES],
    "caption_weight": 0.5,
    "categories": [{"name": "red", "prompts": [f"a red {s}" for s in SHAPES], "threshold": 0.5}],
}


def test_moderation_calibration_hits_precision_and_recall_on_held_out(shapes_encoder, tmp_path):
    mod = Moderator(shapes_encoder, parse_policy(RED_POLICY))
    label = lambda r: {"categories": ["red"] if r["label"].startswith("red") else []}
    cal, _ = _manifest(tmp_path, 24 * 8, 21, label)
    policy = mod.calibrate(cal, precision=0.9, recall=0.95)
    assert parse_policy(policy.to_dict()) == policy  # what `moderate calibrate` writes reads back the same
    test, rows = _manifest(tmp_path, 24 * 8, 22, label)
    res = Moderator(shapes_encoder, policy).moderate([str(test.parent / r["image"]) for r in rows])
    red = np.array([r["label"].startswith("red") for r in rows])
    block = np.array([x["decision"] == "block" for x in res])
    flagged = np.array([x["decision"] != "allow" for x in res])
    assert (block & red).sum() / max(block.sum(), 1) >= 0.8
    assert (flagged & red).sum() / red.sum() >= 0.85
    assert set(res[0]["categories"]["red"]) == {"score", "image_score", "caption_score", "decision", "fired"}


def test_moderation_caption_is_mixed_in(shapes_encoder):
    img = shape_samples(1, size=32, seed=3)[0].image  # whatever colour; the caption decides half the score
    mod = Moderator(shapes_encoder, parse_policy(RED_POLICY))
    with_red = mod.moderate([img], ["a red circle"])[0]["categories"]["red"]
    assert with_red["score"] == pytest.approx(0.5 * with_red["image_score"] + 0.5 * with_red["caption_score"])
    assert with_red["caption_score"] > 0.5 and "a red circle" in with_red["fired"]


def test_tagger_and_moderator_from_text_vectors_need_no_encoder(shapes_encoder):
    # What a caller holding vectors (the service, a collection) does: embed the prompts its own way, then
    # work on image vectors. The answers are those of the encoder-built objects.
    samples = shape_samples(6, size=32, seed=13)
    images = [s.image for s in samples]
    vectors = shapes_encoder.embed_images(images)
    prompts = label_prompts(LABELS, ["a {}"])
    tagger = Tagger.from_text_vectors(LABELS, shapes_encoder.embed_texts(prompts), ["a {}"])
    ref = Tagger(shapes_encoder, LABELS, templates=["a {}"])
    np.testing.assert_allclose(tagger.scores_vectors(vectors), ref.scores(images), atol=1e-6)
    assert tagger.tag_vectors(vectors) == ref.tag(images)

    policy = parse_policy(RED_POLICY)
    texts = policy_texts(policy)
    by_text = dict(zip(texts, shapes_encoder.embed_texts(texts)))
    mod = Moderator.from_text_vectors(policy, by_text, shapes_encoder.logit_scale)
    caption = shapes_encoder.embed_texts(["a red circle"])[0]
    got = mod.moderate_vectors(vectors, [caption] + [None] * 5)
    want = Moderator(shapes_encoder, policy).moderate(images, ["a red circle"] + [None] * 5)
    assert got == [{k: v for k, v in w.items() if k != "item"} for w in want]
    for holder in (tagger, mod):
        with pytest.raises(TypeError, match="no encoder"):
            holder.scores(images)
    with pytest.raises(ValueError, match="no vector for 1 policy text"):
        Moderator.from_text_vectors(policy, {t: v for t, v in by_text.items() if t != texts[-1]}, 100.0)


def test_policy_errors_and_example(tmp_path):
    with pytest.raises(PolicyError, match="categories"):
        parse_policy({"categories": []})
    with pytest.raises(PolicyError, match=r"categories\[0\].*prompts"):
        parse_policy({"categories": [{"name": "x", "prompts": "not a list"}]})
    with pytest.raises(PolicyError, match="unknown key"):
        parse_policy({"categories": [{"name": "x", "prompts": ["a"], "treshold": 1}]})
    policy = load_policy(EXAMPLE_POLICY)
    assert len(policy.categories) >= 3 and all(c.prompts for c in policy.categories)


def test_clip_score_definitions(shapes_encoder):
    samples = shape_samples(4, size=32, seed=8)
    images, caps = [s.image for s in samples], [s.captions[0] for s in samples]
    cos = pair_similarity(shapes_encoder, images, caps)
    ref = np.einsum("nd,nd->n", shapes_encoder.embed_images(images), shapes_encoder.embed_texts(caps))
    np.testing.assert_allclose(cos, ref, atol=1e-6)
    np.testing.assert_allclose(clip_score(shapes_encoder, images, caps), 100 * np.maximum(ref, 0), atol=1e-4)
    clip_s = clip_score(shapes_encoder, images, caps, kind="clipscore")
    np.testing.assert_allclose(clip_s, 2.5 * np.maximum(ref, 0), atol=1e-5)
    refs = [[s.captions[1], s.captions[2]] for s in samples]
    r = ref_clip_score(shapes_encoder, images, caps, refs)
    for i in range(4):
        t = shapes_encoder.embed_texts([caps[i], *refs[i]])
        m = max(float((t[1:] @ t[0]).max()), 0.0)
        assert r[i] == pytest.approx(2 * clip_s[i] * m / (clip_s[i] + m), rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        clip_score(shapes_encoder, images, caps, kind="nope")


def test_guidance_gradient_steps_raise_the_score(shapes_encoder):
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 48, 48, requires_grad=True)  # other size than the model's: resized inside
    text = torch.from_numpy(shapes_encoder.embed_texts(["a red square", "a blue circle"]))
    before = pixel_similarity(shapes_encoder, pixels, text).detach()
    opt = torch.optim.Adam([pixels], lr=0.05)
    for _ in range(10):
        loss = guidance_loss(shapes_encoder, pixels, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            pixels.clamp_(0, 1)
    after = pixel_similarity(shapes_encoder, pixels, text).detach()
    assert (after > before + 0.1).all(), (before, after)
    # The differentiable path agrees with the encoder on an image that needs no resizing.
    img = shape_samples(1, size=32, seed=4)[0].image
    px = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    got = pixel_similarity(shapes_encoder, px, text[0]).item()
    assert got == pytest.approx(float(shapes_encoder.embed_images([img])[0] @ text[0].numpy()), abs=1e-5)


def test_rank_both_ways(shapes_encoder):
    samples = [
        s
        for s in shape_samples(24, size=32, seed=6)
        if s.label in ("red circle", "blue square", "green cross")
    ]
    ranked = rank_images(shapes_encoder, "a blue square", [s.image for s in samples])
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0)
    assert [r["similarity"] for r in ranked] == sorted((r["similarity"] for r in ranked), reverse=True)
    assert samples[[str(s.image) for s in samples].index(ranked[0]["image"])].label == "blue square"
    texts = rank_texts(shapes_encoder, samples[0].image, ["a blue square", "a red circle", "a green cross"])
    assert texts[0]["text"] == "a " + samples[0].label


def _two_shapes(red_q: int, blue_q: int, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), "white")
    d, h = ImageDraw.Draw(img), size // 2
    corners = [(0, 0), (h, 0), (0, h), (h, h)]  # quadrants: top-left, top-right, bottom-left, bottom-right
    x, y = corners[red_q]
    d.rectangle([x + 2, y + 2, x + h - 3, y + h - 3], fill=COLORS["red"])
    x, y = corners[blue_q]
    d.ellipse([x + 1, y + 1, x + h - 2, y + h - 2], fill=COLORS["blue"])
    return img


def _quadrant(heat: np.ndarray) -> int:
    h = heat.shape[0] // 2
    return int(
        np.argmax([heat[:h, :h].mean(), heat[:h, h:].mean(), heat[h:, :h].mean(), heat[h:, h:].mean()])
    )


def test_explain_finds_the_red_square(shapes_encoder, tmp_path):
    pairs = [(r, b) for r in range(4) for b in range(4) if r != b]
    hits = sum(
        _quadrant(explain(shapes_encoder, _two_shapes(r, b), "a red square")[0]) == r for r, b in pairs
    )
    assert hits >= 10, f"{hits}/12"  # chance: 3/12
    heat, crop = explain(shapes_encoder, _two_shapes(0, 3), "a red square", method="gradient")
    assert heat.shape == (32, 32) and heat.min() == 0 and heat.max() == pytest.approx(1.0)
    out = save_overlay(crop, heat, tmp_path / "heat.png")
    assert Image.open(out).size == (3 * 256 + 16, 256)


def test_app_clis(capsys, shapes_model_dir, tmp_path):
    m = str(shapes_model_dir)
    wanted = ["red circle", "blue square", "green cross"]
    samples = [s for s in shape_samples(24, size=32, seed=30) if s.label in wanted]
    assert samples[0].label == "red circle"
    paths = []
    for i, s in enumerate(samples):
        paths.append(str(tmp_path / f"{i}.png"))
        s.image.save(paths[-1])

    def run(*args):
        assert main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    (tmp_path / "caps.txt").write_text("\n".join(s.captions[0] for s in samples) + "\n")
    scores = run("score", "--model", m, "--captions", str(tmp_path / "caps.txt"), *paths)
    assert len(scores["items"]) == 3 and "clip_s" in scores["mean"]
    ranked = run("rank", "--model", m, "--text", "a blue square", *paths)
    assert ranked[0]["image"] == paths[[s.label for s in samples].index("blue square")], ranked
    assert run("rank", "--model", m, "--image", paths[0], "a blue cross", "a red circle")[0]["text"] == (
        "a red circle"
    )
    (tmp_path / "tags.txt").write_text("\n".join(LABELS) + "\n")
    tags = run("tag", "--model", m, "--tags", str(tmp_path / "tags.txt"), *paths)
    assert [t["image"] for t in tags] == paths
    # --vocab is the old name of --tags: same answer, and a warning on stderr.
    assert main(["tag", "--model", m, "--vocab", str(tmp_path / "tags.txt"), *paths, "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == tags and "--vocab FILE is deprecated here; use --tags" in out.err
    assert main(["tag", "--model", m, *paths]) == 2  # no tag file: a one-line error
    assert "tag needs --tags FILE" in capsys.readouterr().err
    cal, _ = _manifest(tmp_path, 48, 40, lambda r: {"tags": [r["label"]]})
    thr = run(
        "tag",
        "calibrate",
        "--model",
        m,
        "--tags",
        str(tmp_path / "tags.txt"),
        "--manifest",
        str(cal),
        "--precision",
        "0.8",
        "--out",
        str(tmp_path / "thr.json"),
    )
    assert thr["target_precision"] == 0.8 and (tmp_path / "thr.json").is_file()
    (tmp_path / "policy.json").write_text(json.dumps(RED_POLICY))
    policy = ["--policy", str(tmp_path / "policy.json")]
    blue = paths[[s.label for s in samples].index("blue square")]
    res = run("moderate", "--model", m, *policy, paths[0], blue, "--caption", "a red circle", "--caption", "")
    assert [r["decision"] for r in res] == ["block", "allow"], res  # the red circle, the blue square
    assert res[0]["categories"]["red"]["caption_score"] is not None
    label = lambda r: {"categories": ["red"] if r["label"].startswith("red") else []}
    cal, _ = _manifest(tmp_path, 48, 41, label)
    pol = run(
        "moderate",
        "calibrate",
        "--model",
        m,
        "--policy",
        str(tmp_path / "policy.json"),
        "--manifest",
        str(cal),
        "--precision",
        "0.9",
        "--out",
        str(tmp_path / "cal.yaml"),
    )
    assert "calibration" in pol and load_policy(tmp_path / "cal.yaml").categories[0].name == "red"
    ex = run("explain", "--model", m, paths[0], "--text", "a red circle", "--out", str(tmp_path / "h.png"))
    assert Path(ex["out"]).is_file()
