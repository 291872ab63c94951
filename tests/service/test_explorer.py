"""The explanation explorer page (``GET /``) in a real headless Chromium against a real ``bentoml serve``.

Playwright's Python package drives Debian's ``chromium`` (``executable_path``; no browser is
ever downloaded). The tests skip, saying why, where either is missing. Screenshots of each
state, the page weight and the first-result time go to ``runs/explorer/`` (git-ignored;
``FACT_EXPLORER_ARTIFACTS`` overrides the folder).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fact_model.data.synthetic import SyntheticConfig, render_sample
from service.explorer import STATIC_DIR
from tests._support.server import REPO, http, post_multipart, running_server

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.slow,
]  # a real `bentoml serve` per module

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]' installs it)"
)


def _chromium() -> str | None:
    for candidate in (os.environ.get("FACT_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip(
        "no chromium executable (apt-get install -y chromium, or set FACT_CHROMIUM); "
        "the explorer's browser tests never download a browser",
        allow_module_level=True,
    )

ARTIFACTS = Path(os.environ.get("FACT_EXPLORER_ARTIFACTS", REPO / "runs" / "explorer"))
PAGE_WEIGHT_LIMIT = 200 * 1024
BODY_LIMIT = 2 * 1024 * 1024
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def png_bytes(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(render_sample(SyntheticConfig(), "test", index)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def number(text: str) -> float:
    match = NUMBER.search(text.replace("−", "-"))
    assert match, f"no number in {text!r}"
    return float(match.group())


def record(name: str, value: object) -> None:
    """Add ``name: value`` to the artifacts' ``measurements.json`` (and print it: ``pytest -s`` shows it)."""
    path = ARTIFACTS / "measurements.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"[explorer] {name}: {value}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # An empty BentoML home: the service serves the shipped default artifact (the same model
    # `make run` imports into the store; tests/service/test_service.py covers the store path). Saves CI time.
    # A 2 MiB body limit (default 10 MiB) keeps the too-large upload test quick.
    env = {"FACT_MAX_REQUEST_BYTES": str(BODY_LIMIT)}
    with running_server(tmp_path_factory.mktemp("bentoml_home"), env=env) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
        except sync_api.Error as err:  # e.g. a chromium too old or too new for this Playwright
            pytest.skip(f"chromium at {CHROMIUM} does not start under Playwright: {err}")
        yield browser
        browser.close()


class Console:
    """The browser console's errors and uncaught exceptions; ``allow`` names expected ones (regex)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []

    def on_message(self, message) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(re.search(p, e) for p in self.allowed)]


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(20_000)
    console = Console()
    page.on("console", console.on_message)
    page.on("pageerror", lambda err: console.errors.append(f"uncaught: {err}"))
    page.console = console
    page.goto(f"{server}/")
    page.wait_for_selector("#samples .sample img")
    yield page
    context.close()
    assert console.unexpected() == [], f"errors in the browser console: {console.unexpected()}"


def shot(page, name: str, full_page: bool = True) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def upload(page, name: str, data: bytes, mime: str = "image/png") -> None:
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def wait_explained(page) -> None:
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Explained')")
    page.wait_for_function("() => !document.getElementById('result').hasAttribute('aria-busy')")


def displayed(page) -> dict:
    """What the page shows: the class, the chart's rows and the completeness badge."""
    return page.evaluate(
        """() => {
        const rows = [...document.querySelectorAll('#contributions tbody tr[data-concept]')].map(tr => ({
            concept: tr.dataset.concept,
            text: tr.querySelector('td.value').textContent,
            value: Number(tr.querySelector('td.value').dataset.value),
            share: tr.querySelector('td.share').textContent,
        }));
        const row = (name) => document.querySelector(`#contributions tr[data-row="${name}"] td.value`);
        const badge = document.getElementById('completeness');
        return {
            predicted: document.getElementById('predicted-class').textContent,
            title: document.getElementById('why-title').textContent,
            top: [...document.querySelectorAll('#top-classes .class-name')].map(e => e.textContent),
            rows,
            other: row('other') && {text: row('other').textContent, value: Number(row('other').dataset.value)},
            bias: row('bias') && {text: row('bias').textContent, value: Number(row('bias').dataset.value)},
            badge: badge.textContent,
            residual: Number(badge.dataset.residual),
            heatmaps: [...document.querySelectorAll('#heatmaps img.map')].map(i => i.alt),
        };
    }"""
    )


def assert_matches_api(shown: dict, api: dict) -> None:
    assert shown["predicted"] == api["prediction"]["name"]
    assert shown["top"] == [c["name"] for c in api["top_classes"]]
    assert [r["concept"] for r in shown["rows"]] == [f"{c['layer']}:{c['id']}" for c in api["concepts"]]
    for row, concept in zip(shown["rows"], api["concepts"], strict=True):
        assert row["value"] == pytest.approx(concept["contribution"], rel=1e-6, abs=1e-9)
        assert number(row["text"]) == pytest.approx(concept["contribution"], abs=6e-4)  # shown with 3 decimals
        if concept["contribution"] > 0:
            assert number(row["share"]) == pytest.approx(100 * concept["share"], abs=0.06)
    assert shown["other"]["value"] == pytest.approx(api["other"]["contribution"], rel=1e-6, abs=1e-9)
    assert number(shown["other"]["text"]) == pytest.approx(api["other"]["contribution"], abs=6e-4)
    assert shown["residual"] == pytest.approx(api["completeness"]["residual"], rel=1e-6, abs=1e-12)
    residual_text = re.search(r"residual (\S+)", shown["badge"]).group(1)
    assert float(residual_text) == pytest.approx(api["completeness"]["residual"], rel=0.06, abs=1e-12)
    assert shown["badge"].startswith("exact: Σ = ")


def test_page_is_small_and_starts_cleanly(page, server):
    """The page, its CSS and JS (and the small JSON it loads) weigh ≤ 200 KB without images."""
    page.wait_for_function("() => document.getElementById('target').options.length > 1")
    entries = page.evaluate(
        """() => [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
            .map(e => ({name: e.name, type: e.initiatorType, bytes: e.decodedBodySize, transfer: e.transferSize}))"""
    )
    non_images = [e for e in entries if e["type"] != "img" and not e["name"].endswith(".png")]
    names = {e["name"].removeprefix(server) for e in non_images}
    assert {"/", "/static/explorer.js", "/static/explorer.css", "/model", "/samples"} <= names, names
    weight = sum(e["bytes"] for e in non_images)
    shipped = sum(f.stat().st_size for f in STATIC_DIR.iterdir() if f.suffix in {".html", ".css", ".js"})
    record("page_weight_bytes_without_images", weight)
    record("static_files_bytes", shipped)
    assert 0 < weight <= PAGE_WEIGHT_LIMIT and shipped <= PAGE_WEIGHT_LIMIT
    assert all(e["name"].startswith(server) or e["name"].startswith("data:") for e in entries), "off-site request"
    classes = http("GET", f"{server}/model")[1]["classes"]
    assert page.locator("#target option").count() == len(classes) + 1
    samples = page.locator("#samples img")
    assert samples.count() == 10 and all(samples.nth(i).get_attribute("alt") for i in range(10))
    assert page.locator("#result").is_hidden()
    shot(page, "01-start")


def test_upload_shows_what_the_api_returns(page, server):
    data = png_bytes(3)
    upload(page, "three.png", data)
    wait_explained(page)
    first = page.evaluate("() => performance.getEntriesByName('fact:first-result').map(e => e.duration)")
    assert len(first) == 1 and first[0] > 0
    record("first_result_ms_after_upload", round(first[0], 1))  # reported, not asserted (a timing)
    request = page.evaluate(
        "() => performance.getEntriesByType('resource').filter(e => e.name.endsWith('/explain')).map(e => e.duration)"
    )
    record("of_which_explain_request_ms", round(request[0], 1))
    status, api = post_multipart(f"{server}/explain", {"top_k": "5", "heatmap_kind": "bcos"}, "image", "3.png", data)
    assert status == 200, api
    shown = displayed(page)
    assert_matches_api(shown, api)
    assert shown["title"] == f"3 · Why “{api['target']['name']}”"
    assert shown["bias"]["value"] == pytest.approx(api["logit_bias"])
    assert len(shown["heatmaps"]) == 5
    assert all(alt.startswith("B-cos colour heatmap of concept") for alt in shown["heatmaps"])
    # The tree: the first concept's children, as the API lists them.
    tree_children = (
        page.locator("#tree > li")
        .first.locator(".children li")
        .evaluate_all("items => items.map(li => li.dataset.concept)")
    )
    assert tree_children == [f"{c['layer']}:{c['id']}" for c in api["concepts"][0]["children"]]
    alts = page.locator("#result img").evaluate_all("images => images.map(i => i.getAttribute('alt'))")
    assert None not in alts and len(alts) == 11  # the input, then per concept a map over its image (alt="")
    assert page.locator("#input-image").get_attribute("alt") == "The explained image: three.png"
    assert not re.search(r"\b(null|undefined|NaN)\b", page.inner_text("#result"))
    shot(page, "02-result-desktop")
    # Five more uploads on the same page: the first-result time of each (reported, not asserted).
    for index in (10, 11, 12, 13, 14):
        upload(page, f"{index}.png", png_bytes(index))
        page.wait_for_function(
            f"() => performance.getEntriesByName('fact:first-result').length === {index - 8}"
            f" && document.getElementById('input-caption').textContent === '{index}.png'"
        )
    times = page.evaluate("() => performance.getEntriesByName('fact:first-result').map(e => e.duration)")
    record("first_result_ms_all_uploads", [round(t, 1) for t in times])
    record("first_result_ms_median", round(sorted(times)[len(times) // 2], 1))
    upload(page, "three.png", data)  # back to the asserted image for the screenshots below
    wait_explained(page)
    page.wait_for_function("() => performance.getEntriesByName('fact:first-result').length === 7")
    page.set_viewport_size(PHONE)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"], "horizontal scroll on a phone"
    shot(page, "03-result-phone")

    # The signed view: a new request with heatmap_kind=signed.
    page.check('input[name="kind"][value="signed"]')
    page.wait_for_function(
        "() => [...document.querySelectorAll('#heatmaps img.map')].every(i => i.alt.startsWith('Signed'))"
        " && document.querySelectorAll('#heatmaps img.map').length > 0"
    )
    wait_explained(page)
    page.set_viewport_size(DESKTOP)
    shot(page, "04-signed-heatmaps")
    page.uncheck("#show-maps")  # hide the maps: the plain image under each concept, no request
    assert page.locator("#heatmaps img.map").count() == 0 and page.locator("#heatmaps img.under").count() == 5
    page.check("#show-maps")
    assert page.locator("#heatmaps img.map").count() == 5


def test_concept_card_opens_and_closes_by_keyboard(page, server):
    upload(page, "five.png", png_bytes(5))
    wait_explained(page)
    button = page.locator("#contributions tbody button.concept").first
    layer, concept = button.get_attribute("data-layer"), button.get_attribute("data-id")
    button.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#card-body .examples img")
    status, card = http("GET", f"{server}/concepts/{layer}/{concept}")
    assert status == 200, card
    assert page.locator("#card").evaluate("d => d.open")
    assert page.locator("#card-title").text_content() == f"Concept {layer} #{concept}"
    frequency = number(page.locator("#card-body .frequency").text_content())
    assert frequency == pytest.approx(100 * card["frequency"], abs=0.06)
    supports = page.locator("#card-body .supports .class-name").all_text_contents()
    assert supports == [s["name"] for s in card["supports"][:5]]
    assert page.locator("#card-body .examples li").count() == len(card["examples"])
    shot(page, "05-concept-card", full_page=False)
    page.keyboard.press("Escape")
    assert not page.locator("#card").evaluate("d => d.open")
    assert page.evaluate("() => document.activeElement.dataset.id") == concept  # focus back on the opener

    # A lower-layer concept from the tree opens its own card.
    child = page.locator("#tree .children button.concept").first
    child_layer, child_id = child.get_attribute("data-layer"), child.get_attribute("data-id")
    child.click()
    page.wait_for_function(
        f"() => document.getElementById('card-title').textContent === 'Concept {child_layer} #{child_id}'"
    )
    page.wait_for_selector("#card-body .frequency")
    page.locator("#card-close").click()


def test_target_and_contrast_update_the_view(page, server):
    data = png_bytes(7)
    upload(page, "seven.png", data)
    wait_explained(page)
    predicted = displayed(page)["predicted"]
    status, base = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", "7.png", data)
    other = base["top_classes"][1]

    # "why not this?" on the runner-up: why predicted rather than the runner-up.
    page.locator(f'#top-classes li[data-class="{other["index"]}"] button', has_text="why not this?").click()
    page.wait_for_function("() => document.getElementById('why-title').textContent.includes('rather than')")
    wait_explained(page)
    status, api = post_multipart(
        f"{server}/explain", {"top_k": "5", "contrast": str(other["index"])}, "image", "7.png", data
    )
    assert status == 200, api
    shown = displayed(page)
    assert_matches_api(shown, api)
    assert shown["title"] == f"3 · Why “{predicted}” rather than “{other['name']}”"
    assert not re.search(r"\b(null|undefined|NaN)\b", page.inner_text("#result"))
    assert "logit(A) − logit(B)" in shown["badge"] and shown["bias"] is None
    assert page.locator("#contrast").input_value() == str(other["index"])
    shot(page, "06-contrast")

    # Another target from the select: the view explains that class (contrast cleared first).
    page.select_option("#contrast", "")
    wait_explained(page)
    page.select_option("#target", str(other["index"]))
    page.wait_for_function(f"() => document.getElementById('why-title').textContent === '3 · Why “{other['name']}”'")
    wait_explained(page)
    fields = {"top_k": "5", "target": str(other["index"])}
    status, api = post_multipart(f"{server}/explain", fields, "image", "7.png", data)
    assert status == 200 and api["target"]["index"] == other["index"]
    assert_matches_api(displayed(page), api)
    shot(page, "07-other-target")


def test_bad_upload_shows_the_api_error(page, server):
    page.console.allowed.append(r"status of 400")  # Chromium logs every failed request; this one is expected
    upload(page, "two.png", png_bytes(2))
    wait_explained(page)
    upload(page, "notes.txt", b"these are not pixels", mime="text/plain")
    error = page.locator("#error")
    error.wait_for(state="visible")
    status, api = post_multipart(f"{server}/explain", {}, "image", "notes.txt", b"these are not pixels")
    assert (status, api["reason"]) == (400, "not_an_image") and api["error"].startswith("the data is not a readable")
    assert api["error"] in error.text_content() and "HTTP 400" in error.text_content()
    assert error.text_content().startswith("Could not explain notes.txt.")
    assert page.locator("#result").is_hidden()  # the previous image's result is not left on screen
    assert error.get_attribute("role") == "alert"
    shot(page, "08-error")
    assert [e for e in page.console.errors if "status of 400" in e], "the expected failed request was not logged"
    # The next good image clears the message.
    upload(page, "one.png", png_bytes(1))
    wait_explained(page)
    assert error.is_hidden()


def test_sample_by_keyboard(page, server):
    """Tab to a sample thumbnail and press Enter: the sample is explained."""
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.classList.contains('sample')"):
            break
    else:
        pytest.fail("no sample thumbnail reachable with Tab")
    index = int(page.evaluate("() => document.activeElement.dataset.index"))
    page.keyboard.press("Enter")
    wait_explained(page)
    samples = http("GET", f"{server}/samples")[1]["samples"]
    status, api = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", "s.png", png_bytes(index))
    assert status == 200
    assert samples[index]["index"] == index and displayed(page)["predicted"] == api["prediction"]["name"]
    assert_matches_api(displayed(page), api)


def test_sample_routes_and_errors(server):
    status, body = http("GET", f"{server}/samples")
    assert status == 200 and [s["label"] for s in body["samples"]] == list(range(10))
    status, data = http("GET", f"{server}{body['samples'][2]['url']}")
    assert status == 200 and data == png_bytes(2)
    status, body = http("GET", f"{server}/samples/99.png")
    assert (status, body["status"], body["reason"]) == (404, 404, "unknown_sample"), body
    assert body["error"] == "sample 99 is out of range [0, 9]"
    status, body = http("GET", f"{server}/static/missing.js")
    assert (status, body["status"], body["reason"]) == (404, 404, "not_found"), body
    assert "/static/missing.js" in body["error"]
    status, page = http("GET", f"{server}/docs")  # BentoML's Swagger UI, moved from / to /docs
    assert status == 200 and b"swagger" in page.lower()


def test_dropped_image_is_explained(page, server):
    """Drag and drop: a ``drop`` event carrying a PNG file on the drop zone."""
    data = png_bytes(4)
    page.evaluate(
        """([b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        const zone = document.getElementById('drop');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""",
        [base64.b64encode(data).decode()],
    )
    wait_explained(page)
    status, api = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", "4.png", data)
    assert status == 200
    assert_matches_api(displayed(page), api)
    assert page.locator("#input-caption").text_content() == "dropped.png"


def test_too_large_upload_shows_the_limit(page, server):
    page.console.allowed.append(r"status of 413")
    upload(page, "huge.png", b"\x89PNG" + bytes(BODY_LIMIT + 1024))
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "HTTP 413 (the file is larger than the service accepts)" in error.text_content()
    assert f"limit of {BODY_LIMIT} bytes" in error.text_content()  # the API's own message
    shot(page, "09-too-large", full_page=False)
