"""The web page in a real browser (Debian's chromium driven by Playwright; never `playwright install`).

Serves a collection of synthetic shapes (the fake encoder of test_serve_api knows every answer) with uvicorn on
a loopback port, then: types a query and sees the expected image first, uploads an image, clicks "more like
this", pages, classifies, runs the moderation check, and saves a screenshot to artifacts/serve_page.png.
Skipped only where chromium is missing and $CI is unset; CI installs it and must run this.
"""

from __future__ import annotations

import json
import os
import re
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

from clipforge.data.synthetic import COLORS  # noqa: E402
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


def test_search_upload_more_like_this_classify(site):
    from playwright.sync_api import expect, sync_playwright

    url, labels, tmp = site
    query_png = tmp / "query.png"
    query_png.write_bytes(shape_png("yellow", "square", seed=5))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
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
