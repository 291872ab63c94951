"""The explanation explorer page (``GET /``) in a real headless Chromium against a real ``bentoml serve``.

Playwright's Python package drives Debian's ``chromium`` (``executable_path``; no browser is
ever downloaded). The tests skip, saying why, where either is missing. Screenshots of each
state, the page weight and the first-result time go to ``runs/explorer/`` (git-ignored;
``FACT_EXPLORER_ARTIFACTS`` overrides the folder).

The server serves a private copy of the default model with an admin token, so the label edits
of these tests go to a temporary folder, never into ``fact_model/weights/default``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fact_model.artifacts import resolve_artifact_path
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
TOKEN = "explorer-admin-token-0123456789"
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
    # An empty BentoML home and a private copy of the shipped default artifact (the same model
    # `make run` imports into the store; tests/service/test_service.py covers the store path): its
    # label file is written next to the copy. A 2 MiB body limit (default 10 MiB) keeps the
    # too-large upload test quick.
    artifact = tmp_path_factory.mktemp("artifact") / "default"
    shutil.copytree(resolve_artifact_path("default"), artifact)
    env = {"FACT_MAX_REQUEST_BYTES": str(BODY_LIMIT), "FACT_ARTIFACT": str(artifact), "FACT_ADMIN_TOKEN": TOKEN}
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


@contextlib.contextmanager
def explorer(browser, server, **context_options):
    """The explorer loaded in a new browser context; its console must stay free of unexpected errors."""
    context = browser.new_context(**{"viewport": DESKTOP, **context_options})
    page = context.new_page()
    page.set_default_timeout(20_000)
    console = Console()
    page.on("console", console.on_message)
    page.on("pageerror", lambda err: console.errors.append(f"uncaught: {err}"))
    page.console = console
    page.goto(f"{server}/")
    page.wait_for_selector("#samples .sample img")
    try:
        yield page
    finally:
        context.close()
    assert console.unexpected() == [], f"errors in the browser console: {console.unexpected()}"


@pytest.fixture
def page(browser, server):
    with explorer(browser, server) as page:
        yield page


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
    assert (
        None not in alts and len(alts) == 12
    )  # the input, the region image, per concept a map over the image (alt="")
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


# ----------------------------------------------------------------------------- issue 17: region, intervention, labels
def send(method: str, url: str, payload: dict, token: str | None = None):
    """``(status, parsed JSON)`` of a JSON request, with a bearer token when given."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http(method, url, json.dumps(payload).encode(), headers)


def concept_name(concept: dict) -> str:
    return f"{concept['layer']} #{concept['id']}"


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> dict:
    """A mouse drag on ``selector`` from ``start`` to ``end`` (fractions of its width and height); its box."""
    page.locator(selector).scroll_into_view_if_needed()
    box = page.locator(selector).bounding_box()

    def point(at):
        return box["x"] + at[0] * box["width"], box["y"] + at[1] * box["height"]

    page.mouse.move(*point(start))
    page.mouse.down()
    page.mouse.move(*point(end), steps=6)
    page.mouse.up()
    return box


def is_region_request(request) -> bool:
    return request.method == "POST" and request.url.endswith("/explain") and '"region"' in (request.post_data or "")


def wait_region(page, title_part: str = "") -> None:
    page.wait_for_function(
        "(part) => { const out = document.getElementById('region-result');"
        " return !out.hasAttribute('aria-busy') && document.getElementById('region-total') !== null"
        " && out.querySelector('h3').textContent.includes(part); }",
        arg=title_part,
    )


def region_shown(page) -> dict:
    return page.evaluate(
        """() => {
        const figure = (name) => document.getElementById(`region-${name}`);
        const out = {};
        for (const name of ['total', 'share', 'coverage', 'outside'])
            out[name] = {value: Number(figure(name).dataset.value), text: figure(name).textContent};
        out.title = document.querySelector('#region-result h3').textContent;
        out.rows = [...document.querySelectorAll('#region-concepts tbody tr')].map(tr => ({
            concept: tr.dataset.concept,
            value: Number(tr.querySelector('td.value').dataset.value),
            text: tr.querySelector('td.value').textContent,
            whole: Number(tr.querySelector('td.whole').dataset.value),
        }));
        return out;
    }"""
    )


def assert_region_matches(shown: dict, region: dict) -> None:
    for name in ("total", "share", "coverage", "outside"):
        assert shown[name]["value"] == pytest.approx(region[name], rel=1e-6, abs=1e-9), name
    assert number(shown["total"]["text"]) == pytest.approx(region["total"], abs=6e-4)
    assert number(shown["outside"]["text"]) == pytest.approx(region["outside"], abs=6e-4)
    assert number(shown["share"]["text"]) == pytest.approx(100 * region["share"], abs=0.06)
    assert number(shown["coverage"]["text"]) == pytest.approx(100 * region["coverage"], abs=0.06)
    assert [r["concept"] for r in shown["rows"]] == [f"{c['layer']}:{c['id']}" for c in region["concepts"]]
    for row, concept in zip(shown["rows"], region["concepts"], strict=True):
        assert row["value"] == pytest.approx(concept["contribution"], rel=1e-6, abs=1e-9)
        assert number(row["text"]) == pytest.approx(concept["contribution"], abs=6e-4)
        assert row["whole"] == pytest.approx(concept["in_image"], rel=1e-6, abs=1e-9)


def test_dragged_box_queries_that_region(page, server):
    """Drag a box: the page sends it in model pixels, and shows what a direct ``/explain`` with it returns."""
    data = png_bytes(3)
    upload(page, "three.png", data)
    wait_explained(page)
    size = http("GET", f"{server}/model")[1]["input_size"]
    start, end = (0.05, 0.07), (0.54, 0.46)  # no edge near half a model pixel: rounding is unambiguous
    with page.expect_request(is_region_request) as sent:
        surface = drag(page, "#region-surface", start, end)
    body = json.loads(sent.value.post_data)
    box = body["region"]["box"]
    expected = [round(f * size) for f in (start[0], start[1], end[0], end[1])]
    assert [box[k] for k in ("x0", "y0", "x1", "y1")] == expected
    prefix, _, encoded = body["image_base64"].partition(",")
    assert prefix == "data:image/png;base64" and base64.b64decode(encoded) == data  # the same image
    assert (body["heatmaps"], body["top_k"]) == ("none", 5)
    wait_region(page)
    status, api = send("POST", f"{server}/explain", body)
    assert status == 200, api
    assert body["target"] == api["target"]["index"] and api["region"]["box"] == expected
    shown = region_shown(page)
    assert_region_matches(shown, api["region"])
    assert (
        shown["title"]
        == f"Region x {expected[0]}–{expected[2]}, y {expected[1]}–{expected[3]} of {size} × {size} pixels"
    )
    drawn = page.locator("#region-box").bounding_box()  # the box drawn where it was dragged, snapped to pixels
    pixel = surface["width"] / size
    assert drawn["x"] - surface["x"] == pytest.approx(expected[0] * pixel, abs=1)
    assert drawn["width"] == pytest.approx((expected[2] - expected[0]) * pixel, abs=1)
    assert drawn["height"] == pytest.approx((expected[3] - expected[1]) * pixel, abs=1)
    assert [page.input_value(f"#box-{k}") for k in ("x0", "y0", "x1", "y1")] == [str(v) for v in expected]
    shot(page, "10-region")

    # By keyboard: "Whole image" — the region is the explanation itself.
    page.locator("#region-whole").focus()
    page.keyboard.press("Enter")
    wait_region(page, f"x 0–{size}, y 0–{size}")
    status, whole = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", "3.png", data)
    shown = region_shown(page)
    assert shown["total"]["value"] == pytest.approx(whole["explained"], rel=1e-5)
    assert shown["coverage"]["value"] == pytest.approx(1.0) and shown["outside"]["value"] == pytest.approx(0, abs=1e-4)
    assert [r["concept"] for r in shown["rows"]] == [f"{c['layer']}:{c['id']}" for c in whole["concepts"]]
    assert all(r["value"] == pytest.approx(r["whole"], rel=1e-5) for r in shown["rows"])

    # A typed box the API refuses: its message, in the region panel.
    page.console.allowed.append(r"status of 400")
    for name, value in zip(("x0", "y0", "x1", "y1"), (30, 0, 10, size), strict=True):
        page.fill(f"#box-{name}", str(value))
    with page.expect_request(is_region_request) as sent:
        page.press("#box-y1", "Enter")
    status, refused = send("POST", f"{server}/explain", json.loads(sent.value.post_data))
    assert (status, refused["reason"]) == (400, "bad_region"), refused
    alert = page.locator("#region-result .error")
    alert.wait_for(state="visible")
    assert alert.get_attribute("role") == "alert" and refused["error"] in alert.text_content()
    assert "HTTP 400" in alert.text_content()
    page.locator("#region-clear").click()
    assert page.locator("#region-box").is_hidden() and page.locator("#region-total").count() == 0


def test_region_by_touch_on_a_phone(browser, server):
    """A touch drag (real touch events through the DevTools protocol) queries the region too."""
    with explorer(browser, server, viewport=PHONE, has_touch=True, is_mobile=True) as page:
        upload(page, "four.png", png_bytes(4))
        wait_explained(page)
        page.locator("#region-surface").scroll_into_view_if_needed()
        box = page.locator("#region-surface").bounding_box()
        size = http("GET", f"{server}/model")[1]["input_size"]
        cdp = page.context.new_cdp_session(page)

        def touch(kind: str, fx: float | None = None, fy: float | None = None) -> None:
            points = [] if fx is None else [{"x": box["x"] + fx * box["width"], "y": box["y"] + fy * box["height"]}]
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

        with page.expect_request(is_region_request) as sent:
            touch("touchStart", 0.3, 0.3)
            for step in range(1, 6):
                touch("touchMove", 0.3 + 0.1 * step, 0.3 + 0.08 * step)
            touch("touchEnd")
        box_sent = json.loads(sent.value.post_data)["region"]["box"]
        assert box_sent == {
            "x0": round(0.3 * size),
            "y0": round(0.3 * size),
            "x1": round(0.8 * size),
            "y1": round(0.7 * size),
        }
        wait_region(page)
        status, api = send("POST", f"{server}/explain", json.loads(sent.value.post_data))
        assert status == 200, api
        assert_region_matches(region_shown(page), api["region"])
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"], "horizontal scroll"
        page.locator("#region-surface").scroll_into_view_if_needed()
        shot(page, "11-region-phone-touch", full_page=False)


def intervention_shown(page) -> dict:
    return page.evaluate(
        """() => {
        const body = document.getElementById('intervention-body');
        const cell = (row, name) => body.querySelector(`tr[data-row="${row}"] td.${name}`);
        const pair = (row) => ({
            before: Number(cell(row, 'before').dataset.value),
            after: Number(cell(row, 'after').dataset.value),
            text: cell(row, 'after').textContent,
        });
        const change = (row) => ({value: Number(cell(row, 'value').dataset.value), text: cell(row, 'value').textContent,
            label: body.querySelector(`tr[data-row="${row}"] th`).textContent});
        return {
            status: document.getElementById('intervention-status').textContent,
            prediction: cell('prediction', 'after').textContent,
            predictionBefore: cell('prediction', 'before').textContent,
            probability: pair('probability'),
            explained: pair('explained'),
            predicted: change('predicted'),
            measured: change('measured'),
            gap: change('gap'),
            concepts: [...body.querySelectorAll('.after-concepts li')].map(li => ({
                concept: li.dataset.concept, value: Number(li.querySelector('.value').dataset.value),
                text: li.querySelector('.value').textContent})),
        };
    }"""
    )


def wait_intervention(page, removed: list[str]) -> None:
    page.wait_for_function(
        "(names) => { const box = document.getElementById('intervention');"
        " return !box.hidden && !box.hasAttribute('aria-busy') && box.querySelector('.compare') !== null"
        " && document.getElementById('intervention-status').textContent.includes(names); }",
        arg=", ".join(removed),
    )


def toggle(page, concept: dict):
    return page.get_by_role("checkbox", name=f"Include concept {concept_name(concept)} (clear to switch it off)")


def test_switching_concepts_off_shows_the_intervention(page, server):
    data = png_bytes(6)
    upload(page, "six.png", data)
    wait_explained(page)
    status, api = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", "6.png", data)
    assert status == 200, api
    first, second = api["concepts"][:2]
    assert page.get_by_role("checkbox", name=re.compile(r"^Include concept ")).count() == len(api["concepts"])
    toggle(page, first).uncheck()
    wait_intervention(page, [concept_name(first)])
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/intervene")) as sent:
        toggle(page, second).uncheck()
    removed = sorted([first, second], key=lambda c: c["id"])
    wait_intervention(page, [concept_name(c) for c in removed])
    body = json.loads(sent.value.post_data)
    assert body["remove"] == [c["id"] for c in removed] and body["layer"] == api["layer"]
    assert body["target"] == api["target"]["index"] and body["top_k"] == 5
    status, iv = send("POST", f"{server}/intervene", body)
    assert status == 200, iv
    shown = intervention_shown(page)
    after = iv["after"]
    assert shown["prediction"] == f"{after['prediction']['name']} ({100 * after['prediction']['probability']:.1f}%)"
    assert shown["predictionBefore"].startswith(api["prediction"]["name"])
    assert shown["probability"]["before"] == pytest.approx(iv["before"]["probability_of_target"], rel=1e-6)
    assert shown["probability"]["after"] == pytest.approx(after["probability_of_target"], rel=1e-6)
    assert shown["explained"]["before"] == pytest.approx(api["explained"], rel=1e-6)
    assert shown["explained"]["after"] == pytest.approx(after["explained"], rel=1e-6, abs=1e-9)
    assert number(shown["explained"]["text"]) == pytest.approx(after["explained"], abs=6e-4)
    for name, label in (("predicted", "predicted by the contributions"), ("measured", "measured"), ("gap", "gap")):
        assert shown[name]["value"] == pytest.approx(iv["change"][name], rel=1e-6, abs=1e-9), name
        assert number(shown[name]["text"]) == pytest.approx(iv["change"][name], abs=6e-4), name
        assert shown[name]["label"] == label
    # The linear prediction is minus the removed concepts' contributions; measured is after − before.
    assert iv["change"]["predicted"] == pytest.approx(-(first["contribution"] + second["contribution"]), rel=1e-5)
    assert shown["measured"]["value"] == pytest.approx(after["explained"] - api["explained"], rel=1e-4, abs=1e-5)
    assert [c["concept"] for c in shown["concepts"]] == [f"{c['layer']}:{c['id']}" for c in after["concepts"]]
    for row, concept in zip(shown["concepts"], after["concepts"], strict=True):
        assert row["value"] == pytest.approx(concept["contribution"], rel=1e-6, abs=1e-9)
    assert_matches_api(displayed(page), api)  # the original stays beside it
    assert not re.search(r"\b(null|undefined|NaN)\b", page.inner_text("#intervention"))
    page.locator("#intervention").scroll_into_view_if_needed()
    shot(page, "12-intervention")
    page.set_viewport_size(PHONE)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"], "horizontal scroll on a phone"
    page.locator("#intervention").screenshot(path=str(ARTIFACTS / "13-intervention-phone.png"))
    page.set_viewport_size(DESKTOP)

    # Both back on, quickly: the answer still on its way (without `second` only) is not shown.
    with page.expect_response(lambda r: r.url.endswith("/intervene")):
        toggle(page, first).check()
        toggle(page, second).check()
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 200))")
    assert page.locator("#intervention").is_hidden()
    assert_matches_api(displayed(page), api)
    # "Switch all back on" resets every box.
    toggle(page, second).uncheck()
    wait_intervention(page, [concept_name(second)])
    page.get_by_role("button", name="Switch all back on").click()
    assert page.locator("#intervention").is_hidden()
    assert all(toggle(page, c).is_checked() for c in api["concepts"])


def test_label_edit_shows_everywhere(page, server):
    """Refusals show the API's message; a saved label shows in the card and the list at once."""
    page.console.allowed.append(r"status of 40[139]")
    data = png_bytes(8)
    upload(page, "eight.png", data)
    wait_explained(page)
    button = page.locator("#contributions tbody button.concept").first
    layer, concept = button.get_attribute("data-layer"), button.get_attribute("data-id")
    url = f"{server}/concepts/{layer}/{concept}/label"
    button.click()
    page.wait_for_selector("#card-body .label-box")
    assert page.locator("#card-body .label-line .clabel").text_content() == "none yet"
    page.locator("#card-body summary", has_text="Add a label").click()
    form = page.get_by_role("form", name=f"Edit the label of concept {layer} #{concept}")
    form.get_by_label("Label", exact=True).fill("pink crescent")
    form.get_by_label("Note", exact=True).fill("the curve, not the colour")
    token = form.get_by_label("Admin token")
    assert token.get_attribute("type") == "password"
    save = form.get_by_role("button", name="Save label")
    alert = form.get_by_role("alert")

    def refused(status: int, api_token: str | None) -> None:
        page.wait_for_function(
            "(text) => [...document.querySelectorAll('#card-body .label-form .error')]"
            ".some(e => !e.hidden && e.textContent.includes(text))",
            arg=f"HTTP {status}",
        )
        code, api = send("PUT", url, {"label": "pink crescent"}, api_token)
        assert code == status and api["error"] in alert.text_content(), (api, alert.text_content())

    save.click()  # no token: 401
    refused(401, None)
    token.fill("wrong-token-wrong-token")
    save.click()
    refused(403, "wrong-token-wrong-token")
    shot(page, "14-label-refused", full_page=False)

    token.fill(TOKEN)
    save.click()
    page.wait_for_selector("#card-body .saved")
    status, stored = http("GET", url)
    assert status == 200 and (stored["label"], stored["note"], stored["version"]) == (
        "pink crescent",
        "the curve, not the colour",
        1,
    )
    assert page.locator("#card-body .label-line .clabel").text_content() == "pink crescent"
    assert "version 1" in page.locator("#card-body .label-line").text_content()
    assert page.locator("#card-body .label-note").text_content() == "the curve, not the colour"
    shot(page, "15-label-saved", full_page=False)
    page.keyboard.press("Escape")

    # Everywhere on the page, without a reload: the chart, the heatmaps, the tree.
    key = f"{layer}:{concept}"
    everywhere = page.locator(f'#result [data-label-for="{key}"]')
    assert everywhere.count() >= 3
    assert set(everywhere.all_text_contents()) == {"pink crescent"}
    row = page.locator(f'#contributions tr[data-concept="{key}"] .clabel')
    assert row.text_content() == "pink crescent" and row.get_attribute("title") == "the curve, not the colour"
    exported = http("GET", f"{server}/labels")[1]
    assert exported["layers"][layer][concept]["label"] == "pink crescent"
    # The token lives in the page's memory only.
    kept = page.evaluate("() => JSON.stringify([localStorage, sessionStorage, location.href, document.cookie])")
    assert TOKEN not in kept
    page.locator(f'#contributions tr[data-concept="{key}"]').scroll_into_view_if_needed()
    shot(page, "16-label-in-list", full_page=False)

    # Someone else edits it meanwhile: the page's write (expecting version 1) is refused with 409.
    page.locator(f'#contributions tr[data-concept="{key}"] button.concept').click()
    page.wait_for_selector("#card-body .label-box")
    status, _ = send("PUT", url, {"label": "ring edge", "expected_version": 1}, TOKEN)
    assert status == 200
    page.locator("#card-body summary", has_text="Edit the label").click()
    form.get_by_label("Label", exact=True).fill("mine")
    assert token.input_value() == TOKEN  # remembered for the page's lifetime
    save.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#card-body .label-form .error')]"
        ".some(e => !e.hidden && e.textContent.includes('HTTP 409'))"
    )
    status, conflict = send("PUT", url, {"label": "mine", "note": "", "expected_version": 1}, TOKEN)
    assert status == 409 and conflict["error"] in alert.text_content()
    page.keyboard.press("Escape")
    # The next response carries the stored label: the page shows it.
    upload(page, "eight.png", data)
    wait_explained(page)
    assert page.locator(f'#contributions tr[data-concept="{key}"] .clabel').text_content() == "ring edge"


def test_label_writes_disabled_show_the_api_message(browser, tmp_path_factory):
    """A server without FACT_ADMIN_TOKEN refuses label writes (403 writes_disabled): the card says why."""
    artifact = tmp_path_factory.mktemp("artifact_read_only") / "default"
    shutil.copytree(resolve_artifact_path("default"), artifact)
    with (
        running_server(tmp_path_factory.mktemp("bentoml_home"), env={"FACT_ARTIFACT": str(artifact)}) as url,
        explorer(browser, url) as page,
    ):
        page.console.allowed.append(r"status of 403")
        upload(page, "one.png", png_bytes(1))
        wait_explained(page)
        button = page.locator("#contributions tbody button.concept").first
        layer, concept = button.get_attribute("data-layer"), button.get_attribute("data-id")
        button.click()
        page.wait_for_selector("#card-body .label-box")
        page.locator("#card-body summary", has_text="Add a label").click()
        form = page.get_by_role("form", name=f"Edit the label of concept {layer} #{concept}")
        form.get_by_label("Label", exact=True).fill("disc")
        form.get_by_label("Admin token").fill(TOKEN)
        form.get_by_role("button", name="Save label").click()
        alert = form.get_by_role("alert")
        alert.wait_for(state="visible")
        status, api = send("PUT", f"{url}/concepts/{layer}/{concept}/label", {"label": "disc"}, TOKEN)
        assert (status, api["reason"]) == (403, "writes_disabled") and "FACT_ADMIN_TOKEN" in api["error"]
        assert api["error"] in alert.text_content() and "HTTP 403" in alert.text_content()
        assert not (artifact / "concept_labels.json").exists()
        shot(page, "17-label-writes-disabled", full_page=False)
