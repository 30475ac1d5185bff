"""Relevance calibration: the logistic fit, its storage in collections and model folders, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipforge.cli import main as cli
from clipforge.index import Collection, CollectionError
from clipforge.index.calibrate import MODEL_FILE, labelled_hits, read_model_file, read_queries
from clipforge.index.relevance import FIXED, Calibration, chance_excess, fit, log_loss

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_fit_recovers_a_known_logistic():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 20_000)
    y = rng.random(len(x)) < 1 / (1 + np.exp(-(x - 1.5) / 0.8))
    cal = fit(x, y, {"what": "synthetic"})
    assert cal.margin == pytest.approx(1.5, abs=0.1) and cal.scale == pytest.approx(0.8, rel=0.06)
    assert cal.fitted == {"what": "synthetic"}
    assert log_loss(cal(x), y) < log_loss(FIXED(x), y)


def test_fit_and_calibration_refuse_what_says_nothing():
    x = np.linspace(-3, 3, 200)
    with pytest.raises(ValueError, match="both relevant and irrelevant"):
        fit(x, np.ones(200, bool))
    with pytest.raises(ValueError, match="at least"):
        fit(x[:10], x[:10] > 0)
    with pytest.raises(ValueError, match="slope"):
        fit(x, x < 0)  # standing out more means less relevant: no calibration says that
    for margin, scale in ((0.0, 0.0), (float("nan"), 1.0), (0.0, -1.0), (float("inf"), 1.0)):
        with pytest.raises(CollectionError, match="scale"):
            Calibration(margin, scale)
    for bad in (None, [], {"margin": 1}, {"margin": "a", "scale": 1}, {"margin": 1, "scale": 0}):
        with pytest.raises(CollectionError, match="relevance"):
            Calibration.from_dict(bad, "somewhere")


class TableEncoder:
    """Embeds the texts it was given vectors for (a query stands for a concept's direction plus noise)."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table, self.dim = table, DIM
        self.identity = {"model": "table", "fingerprint": "sha256:table", "dim": DIM}
        self.logit_scale = 100.0

    def embed_texts(self, texts):
        return np.stack([self.table[t] for t in texts])

    def embed_images(self, images):
        raise NotImplementedError


@pytest.fixture
def concepts(tmp_path):
    """60 concepts of 8 items each around a direction, as spread as a weak model's are, among 1,500 unrelated
    items; queries near each direction, labelled with their concept."""
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((60, DIM)))
    items = unit(np.repeat(centres, 8, axis=0) + 1.1 * unit(rng.standard_normal((480, DIM))))
    noise = unit(rng.standard_normal((1500, DIM)))
    coll = Collection.create(tmp_path / "c", identity={"fingerprint": "sha256:table", "dim": DIM}, dim=DIM)
    records = [{"key": f"i{i}", "metadata": {"concept": f"c{i // 8}"}} for i in range(480)]
    coll.add_vectors(np.concatenate([items, noise]), records + [{"key": f"n{i}"} for i in range(1500)])
    table, queries = {}, []
    for c in range(60):
        for j in range(4):
            text = f"query {j} for c{c}"
            table[text] = unit(centres[c] + 0.9 * unit(rng.standard_normal(DIM)))
            queries.append((text, f"c{c}"))
    yield coll, TableEncoder(table), queries
    coll.close()


def test_a_calibration_fitted_on_some_concepts_is_better_on_others(concepts):
    coll, enc, queries = concepts
    fit_on, held = queries[:120], queries[120:]  # concepts c0-c29 fit, c30-c59 measure
    held_x, held_y, _ = labelled_hits(
        coll, enc.embed_texts([t for t, _ in held]), [c for _, c in held], "concept"
    )
    report = coll.calibrate(fit_on, enc, label="concept")
    assert report["queries"] == 120 and report["hits"] == 1200 and 0 < report["relevant_share"] < 1
    fitted = coll.relevance
    assert fitted.fitted["fingerprint"] == "sha256:table"
    # out of sample: the fit reads relevance better than the hand-set mapping on concepts it never saw
    assert log_loss(fitted(held_x), held_y) < log_loss(FIXED(held_x), held_y) - 0.02


def test_searches_read_relevance_through_the_stored_calibration(concepts, tmp_path):
    coll, enc, queries = concepts
    q = enc.embed_texts([queries[0][0]])[0]
    before = coll.search(vector=q, k=5)
    cal = Calibration(margin=-1.0, scale=2.0)
    coll.set_relevance(cal)
    after = coll.search(vector=q, k=5)
    assert [h.id for h in after] == [h.id for h in before]  # the order is the scores'; only relevance moves
    from clipforge.index.rank import background_sample

    excess = chance_excess(np.array([h.score for h in after]), background_sample(coll, None) @ q, len(coll))
    np.testing.assert_allclose([h.relevance for h in after], cal(excess), atol=1e-5)
    np.testing.assert_allclose([h.relevance for h in before], FIXED(excess), atol=1e-5)
    coll.close()
    reopened = Collection.open(tmp_path / "c", readonly=True)
    assert reopened.relevance == cal and reopened.info()["relevance"]["scale"] == 2.0
    reopened.close()


def test_read_queries_draws_one_caption_per_row_and_names_bad_rows(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        '{"image": "a.png", "captions": ["a", "b"], "concept": "x"}\n\n'
        '{"image": "c.png", "caption": "c", "concept": "y"}\n'
    )
    got = read_queries(p, "concept")
    assert len(got) == 2 and dict(got).get("c") == "y" and ({"a", "b"} & set(dict(got)))
    for line, match in (
        ('{"image": "a.png", "concept": "x"}', "caption"),
        ('{"image": "a.png", "caption": "a"}', "'concept'"),
        ('{"image": "a.png", "caption": "a", "concept": 3}', "'concept'"),
        ("{", "JSON"),
    ):
        p.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            read_queries(p, "concept")


def test_cli_calibrates_stores_in_the_model_and_new_collections_copy_it(
    shapes_model_dir, shapes_test_set, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(shapes_model_dir, model)
    col = tmp_path / "col"
    assert cli(["index", "create", str(col), "--model", str(model)]) == 0
    assert cli(["index", "add", str(col), str(shapes_test_set), "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    code = cli(
        ["index", "calibrate", str(col), str(shapes_test_set), "--label", "label", "--save-model", "--json"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["queries"] == len(read_queries(shapes_test_set, "label")) > 24
    )  # every class, distinct captions
    assert report["log_loss_fit"] < report["log_loss_before"]
    stored = json.loads((col / "collection.json").read_text())["relevance"]
    assert stored["margin"] == pytest.approx(report["margin"])
    fingerprint = json.loads((col / "collection.json").read_text())["model"]["fingerprint"]
    from_model = read_model_file(model, fingerprint)
    assert from_model.margin == pytest.approx(report["margin"])

    # a collection created later for the model gets the model's calibration
    assert cli(["index", "create", str(tmp_path / "col2"), "--model", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["relevance"]["margin"] == pytest.approx(report["margin"])

    # a relevance.json fitted for other weights is refused by name, and create falls back to the fixed one
    d = json.loads((model / MODEL_FILE).read_text())
    d["fitted"]["fingerprint"] = "sha256:other"
    (model / MODEL_FILE).write_text(json.dumps(d))
    with pytest.raises(CollectionError, match="other weights"):
        read_model_file(model, fingerprint)
    with pytest.warns(UserWarning, match="other weights"):
        assert cli(["index", "create", str(tmp_path / "col3"), "--model", str(model), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["relevance"]["margin"] == FIXED.margin
    with pytest.warns(UserWarning):
        assert cli(["index", "calibrate", str(tmp_path / "col3")]) != 0  # nothing to copy: a one-line error
    assert "QUERIES" in capsys.readouterr().err


def test_a_reader_picks_up_a_calibration_written_after_it_opened(concepts, tmp_path):
    coll, _, _ = concepts  # the writer
    reader = Collection.open(tmp_path / "c", readonly=True)  # a server in another process, say
    assert reader.relevance == FIXED
    cal = Calibration(margin=0.5, scale=0.7, fitted={"fingerprint": "sha256:table"})
    coll.set_relevance(cal)
    reader.refresh()  # the service refreshes before every search
    assert reader.relevance == cal and reader.config["relevance"]["scale"] == 0.7
    reader.close()
