"""Abuse suite against a real ``bentoml serve`` on loopback: every input answered correctly or refused clearly.

Each class of problem an outside review found has a test here: image modes and bit depths,
malformed multipart / JSON / base64, huge numbers in paths and fields, a lying Content-Length,
chunked oversize bodies, decompression and dimension bombs, metrics cardinality, /explain
overload. Throughout, a watcher polls the probes and samples the server's memory; the last
tests assert that no request got a 5xx other than deliberate 503 shedding, that every error
had the one shape, that the probes always answered within 0.5 s and that memory stayed bounded.
Deterministic (seeded images, fixed counts) and bounded in time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fact_model.data.synthetic import CLASS_NAMES, SyntheticConfig, render_sample
from tests._support.server import REPO, grey_png, http, jpeg_declaring, running_server, server_rss

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.slow,
]  # a real `bentoml serve` per module

PROBE_BOUND_S = 0.5
RSS_BOUND_BYTES = 500 * 2**20  # growth over the warmed-up baseline allowed at any time in the suite
ERRORS: list[tuple[str, int, dict | bytes, dict]] = []  # every error response the suite saw


def _png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _sample(index: int) -> tuple[np.ndarray, int]:
    image, _, label = render_sample(SyntheticConfig(), "test", index)
    return image, label


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """``(status, body, headers)``; error responses are recorded for the contract checks at the end."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        status, data, got = err.code, err.read(), dict(err.headers)
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        parsed = data
    got = {k.lower(): v for k, v in got.items()}
    if status >= 400:
        ERRORS.append((f"{method} {url[-60:]}", status, parsed, got))
    return status, parsed, got


def _post(url: str, payload: object, timeout: float = 30):
    return _request("POST", url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, timeout)


def _multipart(url: str, parts: list[tuple[str, str | None, bytes]], boundary: str = "fuzzb0undary"):
    """``parts``: (field name, filename or None for a text field, content)."""
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return _request("POST", url, b"".join(chunks), headers)


def _raw(url: str, data: bytes, read_timeout: float = 15) -> tuple[int | None, bytes, float]:
    """Send raw bytes on a new connection; → (status or None, response bytes, seconds until the answer)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=read_timeout) as connection:
        try:
            connection.sendall(data)
        except OSError:
            pass
        response = b""
        try:
            while b"\r\n\r\n" not in response or len(response) < _expected_length(response):
                chunk = connection.recv(65536)
                if not chunk:
                    break
                response += chunk
        except OSError:
            pass
    elapsed = time.monotonic() - started
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else None
    return status, response, elapsed


def _expected_length(response: bytes) -> int:
    head, _, _ = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(response) + 1


class Watcher:
    """Polls /livez and /readyz every 0.1 s and samples the server's RSS, in a background thread."""

    def __init__(self, url) -> None:
        self.url = url
        self.baseline = server_rss(url.pid)
        self.peak = self.baseline
        self.slowest = 0.0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for probe in ("/livez", "/readyz"):
                started = time.monotonic()
                try:
                    status = http("GET", f"{self.url}{probe}", timeout=5)[0]
                except OSError as err:
                    status = repr(err)
                took = time.monotonic() - started
                self.slowest = max(self.slowest, took)
                if status != 200:
                    self.failures.append(f"{probe}: {status}")
            self.peak = max(self.peak, server_rss(self.url.pid))
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml")
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "service.store"], env=env, cwd=REPO, check=True, capture_output=True)
    readiness: list[int | None] = []
    settings = {"FACT_BODY_TIMEOUT": "1", "FACT_QUEUE_BUDGET": "1", "FACT_CORS_ORIGINS": "https://audit.example"}
    with running_server(home, env=settings, readiness=readiness) as url:
        image, _ = _sample(0)
        for _ in range(3):  # warm up before the memory baseline
            assert _post(f"{url}/explain", {"image_base64": _b64(_png(image))})[0] == 200
        watcher = Watcher(url)
        yield url, watcher, readiness, home
        watcher.stop()


def _explained(result: dict) -> float:
    return result["explained"]


# ----------------------------------------------------------------------------- start-up
def test_readyz_answers_503_while_loading_instead_of_refusing_connections(server):
    _, _, readiness, _ = server
    refused = readiness.count(None)
    assert 503 in readiness, readiness
    assert readiness[-1] == 200
    # The socket accepts from the first second: connections are refused only while Python starts.
    first_answer = next(i for i, s in enumerate(readiness) if s is not None)
    assert refused == first_answer and readiness[first_answer:].count(None) == 0, readiness


# ----------------------------------------------------------------------------- image modes and formats
def test_high_bit_depth_and_other_modes_match_the_8_bit_image(server):
    """Every mode is read by its value range: a 16-bit (and 32-bit, float) rendering of an image gets
    the 8-bit image's prediction and explained logit (within one quantisation step's effect)."""
    url, *_ = server
    rgb, label = _sample(4)
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    status, reference, _ = _post(f"{url}/explain", {"image_base64": _b64(_png(gray8)), "heatmaps": "none"})
    assert status == 200
    renderings = {
        "I;16 PNG": _png(gray8.astype(np.uint16) * 257),
        "I TIFF": _tiff(Image.fromarray(gray8.astype(np.int32) * 257, mode="I")),
        "F TIFF": _tiff(Image.fromarray(gray8.astype(np.float32) / 255, mode="F")),
        "LA PNG": _png(np.dstack([gray8, np.full_like(gray8, 255)])),
        "P PNG": _encode(Image.fromarray(gray8).convert("P"), "PNG"),
    }
    for name, data in renderings.items():
        status, result, _ = _post(f"{url}/explain", {"image_base64": _b64(data), "heatmaps": "none"})
        assert status == 200, (name, result)
        assert result["prediction"]["index"] == reference["prediction"]["index"], name
        assert _explained(result) == pytest.approx(_explained(reference), rel=0.05, abs=0.05), name
    status, colour, _ = _post(f"{url}/explain", {"image_base64": _b64(_png(rgb)), "heatmaps": "none"})
    assert status == 200 and colour["prediction"]["index"] == label


def _tiff(image: Image.Image) -> bytes:
    return _encode(image, "TIFF")


def _encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_gif_bmp_tiff_accepted_and_other_formats_refused_with_the_list(server):
    url, *_ = server
    rgb, label = _sample(6)
    image = Image.fromarray(rgb)
    frames = [image, Image.fromarray(255 - rgb)]
    animated = io.BytesIO()
    frames[0].save(animated, format="GIF", save_all=True, append_images=frames[1:])
    for fmt, data in {
        "BMP": _encode(image, "BMP"),
        "TIFF": _encode(image, "TIFF"),
        "GIF (animated: first frame)": animated.getvalue(),
    }.items():
        status, result, _ = _post(f"{url}/predict", {"images": [{"image_base64": _b64(data)}]})
        assert status == 200, (fmt, result)
        if fmt.startswith("BMP") or fmt.startswith("TIFF"):
            assert result[0]["prediction"]["index"] == label, fmt
    status, body, _ = _post(f"{url}/explain", {"image_base64": _b64(_encode(image, "ICO"))})
    assert (status, body["status"], body["reason"]) == (400, 400, "unsupported_format"), body
    assert body["error"] == "image format ICO is not accepted; send one of JPEG, PNG, WebP, GIF, BMP, TIFF"


# ----------------------------------------------------------------------------- fields and schemas
@pytest.mark.parametrize(
    ("field", "value", "reason", "words"),
    [
        ("target", "--1", "unknown_class", "unknown target class '--1': use a class index in [0, 9] or a class name"),
        ("target", "²", "unknown_class", "unknown target class '²'"),
        ("target", "٣", "unknown_class", "unknown target class '٣'"),
        ("target", True, "invalid_request", "invalid request: field 'target"),
        ("target", 10**30, "unknown_class", f"target class index {10**30} is out of range [0, 9]"),
        ("top_k", True, "invalid_request", "invalid request: field 'top_k'"),
        ("top_k", "3", "invalid_request", "invalid request: field 'top_k'"),
        ("top_k", 10**30, "invalid_request", "invalid request: field 'top_k'"),
        ("topk", 3, "invalid_request", "invalid request: unknown field 'topk' (the fields are: "),
        ("layers", ["layer3"] * 10_000, "invalid_request", "invalid request: field 'layers'"),
        ("layers", ["layer3", "layer3"], "unknown_layer", "layers lists ['layer3'] more than once"),
        ("heatmaps", "gif", "invalid_request", "invalid request: field 'heatmaps'"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(server, field, value, reason, words):
    url, *_ = server
    rgb, _ = _sample(1)
    status, body, _ = _post(f"{url}/explain", {"image_base64": _b64(_png(rgb)), field: value})
    assert (status, body["status"], body["reason"]) == (400, 400, reason), body
    assert body["error"].startswith(words), body


def test_contrast_equal_to_target_is_refused(server):
    url, *_ = server
    rgb, label = _sample(2)
    image = _b64(_png(rgb))
    for payload in ({"target": label, "contrast": label}, {"contrast": label}):  # explicit, and the predicted class
        status, body, _ = _post(f"{url}/explain", {"image_base64": image, **payload})
        assert status == 400 and body["reason"] == "contrast_equals_target", body
        assert body["error"].startswith(f"contrast class {CLASS_NAMES[label]!r} ({label}) equals the target class")
    status, _, _ = _post(f"{url}/explain", {"image_base64": image, "target": label, "contrast": (label + 1) % 10})
    assert status == 200


def test_predict_batch_limits_are_deterministic(server):
    url, *_ = server
    rgb, _ = _sample(3)
    item = {"image_base64": _b64(_png(rgb))}
    status, body, _ = _post(f"{url}/predict", {"images": []})
    assert (status, body["reason"]) == (400, "invalid_request") and "field 'images'" in body["error"], body
    for _ in range(3):
        status, body, _ = _post(f"{url}/predict", {"images": [item] * 33})
        assert (status, body["reason"]) == (400, "invalid_request"), body
        assert "field 'images'" in body["error"] and "32" in body["error"], body
    status, results, _ = _post(f"{url}/predict", {"images": [item] * 32})
    assert status == 200 and len(results) == 32
    assert all(r["prediction"] == r["top_classes"][0] for r in results)


def test_common_base64_variants_are_accepted_and_junk_refused(server):
    url, *_ = server
    rgb, label = _sample(5)
    raw = _png(rgb)
    standard = _b64(raw)
    variants = {
        "trailing newline": standard + "\n",
        "MIME lines": base64.encodebytes(raw).decode(),
        "no padding": standard.rstrip("="),
        "URL-safe": base64.urlsafe_b64encode(raw).decode(),
        "data URL": "data:image/png;base64," + standard,
    }
    for name, text in variants.items():
        status, result, _ = _post(f"{url}/predict", {"images": [{"image_base64": text}]})
        assert status == 200, (name, result)
        assert result[0]["prediction"]["index"] == label, name
    status, body, _ = _post(f"{url}/explain", {"image_base64": standard[:40] + "*" + standard[40:]})
    assert status == 400 and body["reason"] == "bad_base64", body
    assert body["error"] == (
        "the image field is not valid base64: character '*' at position 40 of the base64 text is not in the "
        "base64 alphabet"
    )


# ----------------------------------------------------------------------------- multipart
def test_multipart_edge_cases(server):
    url, *_ = server
    rgb, label = _sample(7)
    data = _png(rgb)
    status, body, _ = _multipart(f"{url}/explain", [("image", None, b"photo.png")])  # curl -F image=photo.png
    assert status == 400 and body["reason"] == "image_not_a_file" and "@" in body["error"], body
    status, body, _ = _multipart(f"{url}/explain", [("image", None, b"http://169.254.169.254/latest/meta-data")])
    assert status == 400 and body["reason"] == "image_not_a_file", body
    status, result, _ = _multipart(f"{url}/explain", [("image", "x" * 300 + ".png", data), ("top_k", None, b"3")])
    assert status == 200 and result["prediction"]["index"] == label and len(result["concepts"]) == 3, result
    status, body, _ = _multipart(f"{url}/explain", [("image", "a.png", data), ("top_k", None, b"three")])
    assert (status, body["reason"], body["error"]) == (
        400,
        "invalid_request",
        "field 'top_k' must be an integer, got 'three'",
    ), body
    status, body, _ = _multipart(f"{url}/explain", [("image", "a.png", data), ("topk", None, b"3")])
    assert (status, body["reason"]) == (400, "invalid_request"), body
    assert body["error"].startswith("invalid request: unknown field 'topk' (the fields are: "), body
    status, body, _ = _multipart(f"{url}/explain", [("top_k", None, b"3")])
    assert (status, body["reason"], body["error"]) == (
        400,
        "no_image",
        "send a multipart file 'image' (or JSON with image_base64)",
    ), body
    status, body, _ = _request(
        "POST", f"{url}/explain", b"--x\r\n[]--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert (status, body["reason"]) == (400, "malformed_multipart"), body
    assert body["error"].startswith("the multipart/form-data body is malformed"), body


# ----------------------------------------------------------------------------- paths, bodies, timeouts
def test_huge_numbers_in_paths_are_404_at_once(server):
    url, *_ = server
    for path in ("/concepts/layer3/" + "9" * 4301, "/samples/" + "9" * 4301 + ".png", "/concepts/layer3/-1"):
        started = time.monotonic()
        status, body, _ = _request("GET", f"{url}{path}")
        assert status == 404 and time.monotonic() - started < 1.0, (path[:30], status, body)
        what, reason = ("sample", "unknown_sample") if path.startswith("/samples") else ("concept", "unknown_concept")
        text = path.rsplit("/", 1)[1].removesuffix(".png")
        assert body["reason"] == reason, body
        assert body["error"] == f"{what} {text[:40]!r} is not a valid id: use a non-negative integer", body


def test_lying_content_length_gets_408_quickly(server):
    url, *_ = server
    head = b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
    status, response, elapsed = _raw(url, head + b'{"image_base64": "abc')
    assert status == 408 and b'"reason": "body_timeout"' in response, response[:300]
    assert elapsed < 5, elapsed


def test_chunked_oversize_body_gets_413(server):
    url, *_ = server
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(11 * 16)) + b"0\r\n\r\n"  # 11 MiB
    head = b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, response, _ = _raw(url, head + body)
    assert status == 413 and b'"reason": "too_large"' in response, response[:300]


def test_dimension_and_decompression_bombs_are_refused_cheaply(server):
    url, watcher, *_ = server
    jpeg_bomb = jpeg_declaring(5000, 5000)
    assert len(jpeg_bomb) < 1000
    png_bomb = grey_png(5000, 5000)
    before = server_rss(url.pid)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda data: _post(f"{url}/explain", {"image_base64": _b64(data)}), [jpeg_bomb] * 16))
        answers += list(pool.map(lambda data: _post(f"{url}/explain", {"image_base64": _b64(data)}), [png_bomb] * 4))
    elapsed = time.monotonic() - started
    assert all(status == 400 and body["reason"] == "too_many_pixels" for status, body, _ in answers), answers[:2]
    assert elapsed < 5, elapsed
    assert server_rss(url.pid) - before < 100 * 2**20
    # The largest image allowed (the default limit from the 48 px model: 2048² pixels), 16 at once:
    # decoded two at a time off the event loop, so memory stays bounded and the probes keep answering.
    big = grey_png(2048, 2048)
    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(
            pool.map(lambda d: _post(f"{url}/predict", {"images": [{"image_base64": _b64(d)}]})[0], [big] * 16)
        )
    assert set(statuses) <= {200, 503}, statuses
    assert watcher.peak - watcher.baseline < RSS_BOUND_BYTES


# ----------------------------------------------------------------------------- metrics, overload
def test_metrics_stay_small_after_1000_junk_paths(server):
    url, *_ = server
    before = len(_request("GET", f"{url}/metrics")[1])
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda i: _request("GET", f"{url}/junk/{i}/{'x' * (i % 50)}")[0], range(1000)))
    assert set(statuses) == {404}
    text = _request("GET", f"{url}/metrics")[1]
    text = text.decode() if isinstance(text, bytes) else str(text)
    assert "junk" not in text
    assert len(text) - before < 20_000, (before, len(text))
    assert 'route="other"' in text


def test_explain_overload_is_shed_fast_and_everything_else_served(server):
    url, *_ = server
    rgb, _ = _sample(8)
    payload = {"image_base64": _b64(_png(rgb)), "top_k": 20}

    def call(_):
        started = time.monotonic()
        status, body, headers = _post(f"{url}/explain", payload, timeout=60)
        return status, time.monotonic() - started, headers, body

    with ThreadPoolExecutor(max_workers=64) as pool:
        outcomes = list(pool.map(call, range(64)))
    served = [o for o in outcomes if o[0] == 200]
    refused = [o for o in outcomes if o[0] != 200]
    assert served, outcomes[:3]
    assert all(status in (429, 503) for status, *_ in refused), [o[0] for o in refused]
    assert all("retry-after" in headers for _, _, headers, _ in refused)
    assert max((elapsed for _, elapsed, _, _ in refused), default=0) <= 1.0
    print(f"overload: {len(served)} served (max {max(o[1] for o in served):.2f} s), {len(refused)} refused")


# ----------------------------------------------------------------------------- contract
def test_request_ids_are_echoed_or_generated(server):
    url, *_ = server
    status, _, headers = _request("GET", f"{url}/model", headers={"X-Request-ID": "audit-42"})
    assert status == 200 and headers["x-request-id"] == "audit-42"
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    status, _, headers = _request(
        "GET", f"{url}/concepts/layer3", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    )
    assert status == 200 and headers["x-request-id"] == trace
    status, body, headers = _request(
        "POST", f"{url}/explain", b"x", {"Content-Type": "text/plain", "X-Request-ID": "z" * 500}
    )
    assert status == 415 and len(headers["x-request-id"]) == 32 and body["request_id"] == headers["x-request-id"]
    status, body, headers = _request("GET", f"{url}/concepts/layer9", headers={"X-Request-ID": "audit-43"})
    assert status == 404 and body["request_id"] == "audit-43" == headers["x-request-id"]


def test_no_api_takes_a_file_or_url_input():
    """BentoML downloads a URL given for a file-typed input: none of our APIs has one (multipart is ours)."""
    from service.service import FaCTService

    for name, method in FaCTService.apis.items():
        assert not method.input_spec.multipart_fields, name


def test_openapi_documents_every_route_and_the_error_shape(server):
    url, *_ = server
    status, spec, _ = _request("GET", f"{url}/docs.json")
    assert status == 200
    assert spec["info"]["version"] not in (None, "None", "")
    for path in ("/explain", "/explain_batch", "/predict", "/model", "/concepts/{layer}", "/concepts/{layer}/{concept}",
                 "/samples"):  # fmt: skip
        assert path in spec["paths"], path
    explain = spec["paths"]["/explain"]["post"]
    assert "multipart/form-data" in explain["requestBody"]["content"]
    assert {"400", "413", "429", "503"} <= set(explain["responses"])
    schema = json.dumps(spec["components"]["schemas"]["ExplainRequest"])
    assert '"integer"' in schema and '"string"' in schema  # target: index or name
    assert spec["components"]["schemas"]["ExplainRequest"].get("additionalProperties") is False


def test_cors_allows_only_the_configured_origins(server):
    url, *_ = server
    preflight = {"Origin": "https://audit.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    status, _, headers = _request("OPTIONS", f"{url}/explain", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "https://audit.example"
    status, _, headers = _request("GET", f"{url}/model", headers={"Origin": "https://audit.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://audit.example"
    assert "x-request-id" in headers["access-control-expose-headers"].lower()
    status, _, headers = _request("GET", f"{url}/model", headers={"Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers


def test_unknown_routes_and_methods_have_the_error_shape(server):
    url, *_ = server
    assert _request("GET", f"{url}/nope")[0] == 404
    assert _request("GET", f"{url}/explain")[0] == 405
    assert _request("DELETE", f"{url}/model")[0] == 405


def test_every_error_had_one_shape_and_no_unexpected_5xx(server):
    assert len(ERRORS) > 40
    for where, status, body, headers in ERRORS:
        assert status < 500 or status == 503, (where, status, body)
        assert isinstance(body, dict) and set(body) == {"error", "reason", "status", "request_id"}, (where, body)
        assert body["status"] == status and body["request_id"] == headers["x-request-id"], (where, body)
        assert headers["content-type"].startswith("application/json"), where
        if status in (429, 503):
            assert "retry-after" in headers, where


def test_client_errors_log_one_line_without_traceback(server):
    url, _, _, home = server
    log = next(home.glob(f"server-{url.rsplit(':', 1)[1]}.log")).read_text(errors="replace")
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "invalid_request" in line]
    assert refusals and all("request_id=" in line for line in refusals)  # one INFO line per refusal, with its id
    assert "request_id=audit-43" in log  # the refusal test_request_ids_are_echoed_or_generated sent


def test_probes_answered_within_half_a_second_throughout(server):
    _, watcher, *_ = server
    growth, baseline = (watcher.peak - watcher.baseline) / 2**20, watcher.baseline / 2**20
    print(f"probes: slowest {watcher.slowest:.3f} s; server RSS peak +{growth:.0f} MiB over {baseline:.0f} MiB")
    assert not watcher.failures, watcher.failures[:5]
    assert watcher.slowest <= PROBE_BOUND_S, watcher.slowest
    assert watcher.peak - watcher.baseline < RSS_BOUND_BYTES, (watcher.peak, watcher.baseline)
