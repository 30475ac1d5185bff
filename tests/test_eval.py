"""Evaluation harness: metrics on fake encoders with known answers, retrieval ranks against brute force, and
the reports (JSON, Markdown, PNGs) on a model trained on synthetic shapes in this session."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.data.synthetic import write_shapes
from clipforge.encoder import Encoder
from clipforge.eval import linear_probe_eval, retrieval_eval, zeroshot_eval
from clipforge.eval.manifest import ManifestError
from clipforge.eval.retrieval import retrieval_ranks


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Cached classifiers go to a per-test directory, never the user's cache.
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))


CLASSES = ["apple", "boat", "cloud", "drum"]


class OneHotEncoder:
    """Texts mentioning class c embed to e_c; image files named '<c>_*.png' embed to e_c. No identity, so no
    disk cache. Images are assigned classes by their file name, so the test decides every prediction."""

    identity: dict = {}
    dim = 4
    logit_scale = 100.0

    def embed_texts(self, texts):
        out = np.zeros((len(texts), 4), np.float32)
        for i, t in enumerate(texts):
            hits = [c for c, name in enumerate(CLASSES) if name in t]
            out[i, hits[0] if hits else 0] = 1.0
        return out

    def embed_images(self, images):
        out = np.zeros((len(images), 4), np.float32)
        for i, p in enumerate(images):
            out[i, CLASSES.index(str(p).rsplit("/", 1)[-1].split("_")[0])] = 1.0
        return out


def _write(tmp_path, rows):
    for r in rows:
        Image.new("RGB", (8, 8), (40 * len(r["image"]) % 255, 90, 160)).save(tmp_path / r["image"])
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "m.jsonl"


def test_zeroshot_metrics_on_a_fake_encoder_with_known_answer(tmp_path):
    # 8 images, 2 per true class; 6 are predicted right (their file names say their true class) and 2 wrong.
    preds = ["apple", "apple", "boat", "cloud", "cloud", "cloud", "drum", "boat"]
    truth = ["apple", "apple", "boat", "boat", "cloud", "cloud", "drum", "drum"]
    rows = [{"image": f"{p}_{i}.png", "label": t} for i, (p, t) in enumerate(zip(preds, truth))]
    m = zeroshot_eval(OneHotEncoder(), _write(tmp_path, rows), templates="simple", out_dir=tmp_path / "out")
    assert m["top1"] == 0.75
    assert m["top5"] == 1.0  # only 4 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert m["n"] == 8
    for name in [
        "zeroshot.json",
        "zeroshot.md",
        "zeroshot_similarity.png",
        "zeroshot_confusion.png",
        "zeroshot_per_class.png",
        "zeroshot_mistakes.png",
    ]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "out" / "zeroshot.json").read_text())["top1"] == 0.75
    assert "zeroshot_confusion.png" in (tmp_path / "out" / "zeroshot.md").read_text()


def test_zeroshot_classes_file_and_bad_label(tmp_path):
    rows = [{"image": "apple_0.png", "label": "apple"}, {"image": "boat_1.png", "label": "boat"}]
    manifest = _write(tmp_path, rows)
    classes = tmp_path / "classes.txt"
    classes.write_text("apple\nboat\ncloud\ndrum\n")
    m = zeroshot_eval(OneHotEncoder(), manifest, templates="simple", classes=classes)
    assert m["top1"] == 1.0 and m["classes"] == 4
    classes.write_text("apple\ncloud\n")
    with pytest.raises(ManifestError, match="'boat' is not in the class list"):
        zeroshot_eval(OneHotEncoder(), manifest, templates="simple", classes=classes)


def test_linear_probe_learns_from_train_and_scores_test(tmp_path):
    # Training images are labelled with a permutation of what their file names say, so the right answers
    # can only come from fitting the training manifest: 6 of the 8 test images follow the permutation (right)
    # and 2 keep their own class (wrong), so top-1 is 0.75. Predicting file-name classes would give 0.25, and
    # scoring the training manifest would count 12 images, not 8.
    perm = {"apple": "boat", "boat": "cloud", "cloud": "drum", "drum": "apple"}
    train = [{"image": f"{c}_t{i}.png", "label": perm[c]} for c in CLASSES for i in range(3)]
    test_files = ["apple", "apple", "boat", "boat", "cloud", "cloud", "drum", "drum"]
    test = [
        {"image": f"{c}_{i}.png", "label": c if i in (1, 6) else perm[c]} for i, c in enumerate(test_files)
    ]
    (tmp_path / "tr").mkdir()
    (tmp_path / "te").mkdir()
    m = linear_probe_eval(
        OneHotEncoder(), _write(tmp_path / "tr", train), _write(tmp_path / "te", test), C=10.0
    )
    assert m["top1"] == 0.75 and m["n"] == 8 and m["n_train"] == 12, m


def test_retrieval_ranks_against_brute_force():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((7, 12))
    owner = rng.integers(0, 7, 12)
    owner[:7] = np.arange(7)  # every image has a caption
    i2t, t2i = retrieval_ranks(sims, owner)
    for i in range(7):
        order = list(np.argsort(-sims[i]))
        assert i2t[i] == min(order.index(j) for j in np.flatnonzero(owner == i))
    for j in range(12):
        assert t2i[j] == list(np.argsort(-sims[:, j])).index(owner[j])


def test_retrieval_metrics_on_a_fake_encoder(tmp_path):
    # The fourth image looks like a boat but its caption reads as a cloud: it misses at R@1 both ways.
    rows = [
        {"image": "apple_0.png", "caption": "an apple"},
        {"image": "boat_1.png", "caption": ["a boat", "a boat on water"]},
        {"image": "cloud_2.png", "caption": "a cloud"},
        {"image": "boat_3.png", "caption": "cloud drum"},
    ]
    m = retrieval_eval(OneHotEncoder(), _write(tmp_path, rows), out_dir=tmp_path / "out")
    assert set(m) >= {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    # cloud_2 ties between "a cloud" and "cloud drum" (ties count in its favour); boat_3 ranks 2 boat texts first.
    assert m["image_to_text_R@1"] == 0.75
    assert m["text_to_image_R@1"] == 4 / 5  # "cloud drum" retrieves the cloud image first
    assert m["image_to_text_R@10"] == 1.0 and m["n_texts"] == 5
    assert (tmp_path / "out" / "retrieval_similarity.png").is_file()


def test_evals_on_the_shapes_model(shapes_encoder, shapes_test_set, tmp_path):
    m = zeroshot_eval(shapes_encoder, shapes_test_set, templates="ensemble", out_dir=tmp_path / "zs")
    assert m["top1"] > 0.6 and m["top5"] > 0.9 and m["n"] == 144, m
    r = retrieval_eval(shapes_encoder, shapes_test_set, out_dir=tmp_path / "ret")
    # 144 images but only 24 distinct captions sets: R@10 is the meaningful number (chance ~ 10/144 * 6).
    assert r["text_to_image_R@10"] > 0.3 and r["image_to_text_R@10"] > 0.3, r
    train = write_shapes(tmp_path / "train", 24 * 4, size=32, seed=321)  # other images than the test set
    p = linear_probe_eval(shapes_encoder, train, shapes_test_set, C=10.0, out_dir=tmp_path / "lp")
    assert p["top1"] > 0.8 and p["n_train"] == 96 and p["n"] == 144, p
    assert (tmp_path / "lp" / "linear_probe_confusion.png").is_file()


def test_eval_cli_json(capsys, shapes_model_dir, shapes_test_set, tmp_path):
    args = [
        "eval",
        "zeroshot",
        "--model",
        str(shapes_model_dir),
        "--manifest",
        str(shapes_test_set),
        "--templates",
        "simple",
        "--out",
        str(tmp_path / "r"),
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    # The command evaluates the saved model with the flags it was given: the library's numbers, exactly.
    ref = zeroshot_eval(Encoder.load(shapes_model_dir), shapes_test_set, templates="simple")
    assert out == pytest.approx(ref), (out, ref)
    assert out["top1"] > 0.5  # chance: 1/24
    assert (tmp_path / "r" / "zeroshot.md").is_file()
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--model",
                str(shapes_model_dir),
                "--manifest",
                str(shapes_test_set),
                "--json",
            ]
        )
        == 0
    )
    assert "text_to_image_R@5" in json.loads(capsys.readouterr().out)
