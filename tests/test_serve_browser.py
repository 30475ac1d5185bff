"""The web page in a real browser (Debian's chromium driven by Playwright; never `playwright install`).

Serves a collection of synthetic shapes (the fake encoder of test_serve_api knows every answer) with uvicorn on
a loopback port, then: types a query and sees the expected image first, uploads an image, clicks "more like
this", pages, classifies, runs the moderation check, and saves a screenshot to artifacts/serve_page.png.
A second collection (shapes taken a week apart through 2020, one named with a file-name token, and a video)
drives the search options: the "only relevant" switch, keyword mode, the date filters, date order, and a
video result shown at its moment (artifacts/serve_page_options.png).
Skipped only where chromium is missing and $CI is unset; CI installs it and must run this.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

if not os.environ.get("CI") and not CHROMIUM.exists():
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)
if not os.environ.get("CI"):
    pytest.importorskip("playwright")
pytest.importorskip("fastapi")

from test_serve_api import ShapeEncoder, build_collection, make_config, running_server, shape_png  # noqa: E402

from clipforge.data.synthetic import COLORS, write_shapes  # noqa: E402
from clipforge.index import Collection  # noqa: E402
from clipforge.index.rank import DEFAULT_MIN_RELEVANCE  # noqa: E402
from clipforge.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    col, labels = build_collection(tmp, n=48, captions=False)
    policy = tmp / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "neutral": [c for c in COLORS if c != "red"],
                "categories": [{"name": "red", "prompts": ["red"]}],
            }
        )
    )
    app = create_app(make_config(col, tmp, policy=policy), encoder=ShapeEncoder())
    with running_server(app, lifespan="on") as url:
        yield url, labels, tmp


def open_page(playwright, url: str):
    """Chromium on the page at `url`; returns (browser, page, the page's uncaught JavaScript errors)."""
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return browser, page, errors


def test_search_upload_more_like_this_classify(site):
    from playwright.sync_api import expect, sync_playwright

    url, labels, tmp = site
    query_png = tmp / "query.png"
    query_png.write_bytes(shape_png("yellow", "square", seed=5))
    with sync_playwright() as p:
        browser, page, errors = open_page(p, url)
        expect(page.locator("#status")).to_contain_text("48 items")
        expect(page.locator("#status")).to_contain_text("shape-fake")

        # Words: type, press Enter (keyboard only), and the named shape comes first.
        page.get_by_label("Search by words").fill("blue circle")
        page.get_by_label("Search by words").press("Enter")
        expect(page.locator("#summary")).to_contain_text("blue circle")
        cards = page.locator("#results li")
        assert labels[int(cards.first.get_attribute("data-id"))] == "blue circle"
        assert cards.count() == 24  # one page rendered, not the whole collection
        first_img = cards.first.locator("img")
        expect(first_img).to_have_attribute("alt", re.compile(r"^\d{5}\.png$"))
        page.wait_for_function("document.querySelector('#results li img').naturalWidth > 0")

        # Paging: the next page holds the following results.
        expect(page.locator("#next")).to_be_enabled()
        page.locator("#next").click()
        expect(page.locator("#page-label")).to_have_text("Page 2")
        expect(page.locator("#summary")).to_contain_text("Results 25")
        page.locator("#prev").click()
        expect(page.locator("#page-label")).to_have_text("Page 1")

        # A picture: upload through the file picker.
        page.set_input_files("#image-input", str(query_png))
        expect(page.locator("#summary")).to_contain_text("your image")
        assert labels[int(cards.first.get_attribute("data-id"))] == "yellow square"

        # "More like this" on the third result (a different kind of shape than the query's top hits).
        third = cards.nth(2)
        third_label = labels[int(third.get_attribute("data-id"))]
        third_id = third.get_attribute("data-id")
        third.get_by_role("button", name="More like").click()
        expect(page.locator("#summary")).to_contain_text(f"item {third_id}")
        assert labels[int(cards.first.get_attribute("data-id"))] == third_label

        # Classify the item "more like this" was run on, against typed labels: bars, most probable first.
        page.get_by_label("Labels, comma-separated").fill(f"{third_label}, purple triangle, green cross")
        page.get_by_role("button", name="Classify").click()
        bars = page.locator("#classify-result .bar-row")
        expect(bars).to_have_count(3)
        expect(bars.first.locator(".bar-label")).to_have_text(third_label)
        width = bars.first.locator(".bar-fill").evaluate("e => e.getBoundingClientRect().width")
        track = bars.first.locator(".bar-track").evaluate("e => e.getBoundingClientRect().width")
        assert width > 0.9 * track

        page.get_by_role("button", name="Check image").click()
        expect(page.locator("#moderate-result .decision")).to_have_text(
            "block" if "red" in third_label else "allow"
        )

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
        assert not errors, errors
        browser.close()


# ---- the search options ------------------------------------------------------------------------------------
FIRST_DAY = dt.date(2020, 1, 1)  # shape i was taken i weeks later, at noon
TOKEN_NAME = "harbour_4821.png"  # one shape's file name: a token only keyword search can match


@pytest.fixture(scope="module")
def dated_site(tmp_path_factory):
    """48 shapes with taken_at metadata and a video whose moment at 5 s shows a purple cross (at 0 s a blue
    square); returns the URL and, per shape id, its label and taken_at."""
    import numpy as np
    from media_files import write_video

    from clipforge.data.synthetic import draw_shape

    tmp = tmp_path_factory.mktemp("dated")
    manifest = write_shapes(tmp / "shapes", 48, seed=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = [tmp / "shapes" / r["image"] for r in rows]
    paths[7] = paths[7].rename(paths[7].with_name(TOKEN_NAME))
    taken = [f"{FIRST_DAY + dt.timedelta(weeks=i)}T12:00:00" for i in range(len(paths))]
    square = np.asarray(draw_shape("blue", "square"))
    cross = np.asarray(draw_shape("purple", "cross"))
    (tmp / "videos").mkdir()
    # VP8 in WebM: a codec every Chromium build plays
    write_video(
        tmp / "videos" / "holiday.webm",
        7.5,
        size=(64, 64),
        codec="libvpx",
        draw=lambda i: cross if i >= 50 else square,
    )
    enc = ShapeEncoder()
    with Collection.create(tmp / "col", identity=enc.identity, dim=enc.dim) as c:
        records = [{"path": str(p), "metadata": {"taken_at": t}} for p, t in zip(paths, taken)]
        ids = c.add_vectors(enc.embed_images([str(p) for p in paths]), records)
        assert c.add([tmp / "videos"], enc, workers=0).added == [str(tmp / "videos" / "holiday.webm")]
    shapes = {i: (r["label"], t, p.name) for i, r, t, p in zip(ids, rows, taken, paths)}
    app = create_app(make_config(tmp / "col", tmp), encoder=enc)
    with running_server(app, lifespan="on") as url:
        yield url, shapes


def api_ids(url: str, body: dict) -> list[int]:
    """The ids the HTTP API itself answers for a search (what the page must show for the same options)."""
    req = urllib.request.Request(
        f"{url}/api/search", json.dumps({"k": 25, **body}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return [h["id"] for h in json.load(r)["results"]][:24]


def shown(page) -> list[dict]:
    return page.locator("#results li").evaluate_all(
        """lis => lis.map(li => ({id: +li.dataset.id, taken: li.dataset.taken || null,
            relevance: li.querySelector('.relevance').textContent,
            caption: li.querySelector('.caption').textContent}))"""
    )


def wait_for_ids(page, ids: list[int]) -> list[dict]:
    page.wait_for_function(
        "ids => JSON.stringify([...document.querySelectorAll('#results li')].map(li => +li.dataset.id))"
        " === JSON.stringify(ids)",
        arg=ids,
    )
    return shown(page)


def relevance(card: dict) -> float:
    return float(card["relevance"].removeprefix("relevance "))


def test_relevance_switch_keyword_mode_dates_order_and_a_video_moment(dated_site):
    from playwright.sync_api import expect, sync_playwright

    url, shapes = dated_site
    with sync_playwright() as p:
        browser, page, errors = open_page(p, url)
        expect(page.locator("#status")).to_contain_text("50 items")  # 48 shapes, 2 moments of the video

        # Every hit shows its relevance; "only relevant" drops the ones under the slider (set to 0.50).
        box = page.get_by_label("Search by words")
        box.fill("red circle")
        box.press("Enter")
        every = wait_for_ids(page, api_ids(url, {"text": "red circle"}))
        assert len(every) == 24 and shapes[every[0]["id"]][0] == "red circle"
        assert any(relevance(c) < 0.5 for c in every) and any(relevance(c) >= 0.5 for c in every)
        page.get_by_label("Only relevant").check()
        slider = page.get_by_label("Minimum relevance")
        expect(slider).to_be_enabled()
        # The slider starts at the measured suggestion; with the default model 0.5 would hide most right hits.
        assert float(slider.input_value()) == DEFAULT_MIN_RELEVANCE
        wait_for_ids(page, api_ids(url, {"text": "red circle", "min_relevance": DEFAULT_MIN_RELEVANCE}))
        slider.fill("0.5")
        expect(page.locator("#min-relevance-value")).to_have_text("0.50")
        relevant = wait_for_ids(page, api_ids(url, {"text": "red circle", "min_relevance": 0.5}))
        assert 2 <= len(relevant) < len(every) and all(relevance(c) >= 0.5 for c in relevant)
        assert [c["id"] for c in relevant] == [c["id"] for c in every if relevance(c) >= 0.5]
        assert shapes[relevant[0]["id"]][0] == "red circle"

        # Newest first: the same relevant hits, in date order.
        page.get_by_label("Order").select_option("date")
        dated = wait_for_ids(page, api_ids(url, {"text": "red circle", "min_relevance": 0.5, "sort": "date"}))
        assert sorted(c["id"] for c in dated) == sorted(c["id"] for c in relevant)
        assert [c["taken"] for c in dated] == sorted((c["taken"] for c in dated), reverse=True)
        assert dated != relevant

        # Dates: from 4 March to 25 March 2020, both days included: the four shapes taken that month.
        page.get_by_label("Order").select_option("relevance")
        page.get_by_label("Only relevant").uncheck()
        page.get_by_label("Taken from").fill("2020-03-04")
        page.get_by_label("Taken until").fill("2020-03-25")
        march = {i for i, (_, t, _) in shapes.items() if t.startswith("2020-03")}
        assert len(march) == 4
        page.wait_for_function(
            "n => document.querySelectorAll('#results li').length === n && "
            "[...document.querySelectorAll('#results li')].every(li => li.dataset.taken?.startsWith('2020-03'))",
            arg=len(march),
        )
        assert {c["id"] for c in shown(page)} == march
        expect(page.locator("#results li .date").first).to_contain_text("taken 2020-03")
        page.get_by_label("Taken from").fill("")
        page.get_by_label("Taken until").fill("")

        # Keyword mode finds a file by an exact token of its name, and nothing else.
        page.get_by_label("Match").select_option("keyword")
        box.fill("4821")
        box.press("Enter")
        expect(page.locator("#results li")).to_have_count(1)
        expect(page.locator("#results li .caption")).to_have_text(TOKEN_NAME)

        # A video result is the video itself, at its moment, with the time in its caption.
        page.get_by_label("Match").select_option("")
        box.fill("purple cross")
        box.press("Enter")
        expect(page.locator("#summary")).to_contain_text("purple cross")
        card = page.locator("#results li").filter(has=page.locator("video")).first
        assert int(card.get_attribute("data-rank")) < 3  # the moment at 5 s shows a purple cross
        expect(card.locator(".caption")).to_have_text("holiday.webm at 0:05")
        video = card.locator("video")
        assert video.get_attribute("src").endswith("#t=5")  # the media fragment
        video.evaluate(
            """v => new Promise((ok, fail) => {
                const check = () => v.readyState >= 1 && Math.abs(v.currentTime - 5) < 0.05;
                if (check()) return ok();
                v.addEventListener('seeked', () => check() && ok());
                v.addEventListener('loadedmetadata', () => check() && ok());
                v.addEventListener('error', () => fail(new Error('video error ' + (v.error && v.error.code))));
                setTimeout(() => fail(new Error('not at 5 s: ' + v.currentTime + ' ' + v.readyState)), 15000);
            })"""
        )

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve_page_options.png"), full_page=True)
        assert not errors, errors
        browser.close()
