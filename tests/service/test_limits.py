"""The service's ASGI layers in isolation (no server): shedding, the request gate, and the edge's one error shape."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import pytest
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictInt

from service.edge import Edge, route_label
from service.errors import RequestError
from service.gate import RequestGate, RouteSpec, decoded_image
from service.limits import ConcurrencyLimit, ModelBacklog, QueueShedding


async def _call(app, path: str = "/predict", headers: list | None = None, body: bytes | list[bytes] = b"",
                method: str = "POST", delay: float = 0.0) -> tuple[int, dict, dict]:  # fmt: skip
    """Drive ``app`` with one request (``body`` may be a list of chunks; ``delay`` before the last one)."""
    sent = []
    chunks = list(body) if isinstance(body, list) else [body]

    async def receive():
        if not chunks:
            await asyncio.sleep(3600)  # a client that sends nothing more
        if len(chunks) == 1 and delay:
            await asyncio.sleep(delay)
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or []}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        parsed = {"raw": data}
    return start["status"], dict(start["headers"]), parsed


async def _ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


# ----------------------------------------------------------------------------- shedding
def test_concurrency_limit_sheds_at_once():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await _ok(scope, receive, send)

    limit = ConcurrencyLimit(slow_app, 2)

    async def scenario():
        admitted = [asyncio.create_task(_call(limit)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert limit.in_flight == 2
        status, headers, body = await asyncio.wait_for(_call(limit), timeout=1)  # answered without waiting
        assert (status, body["status"], body["reason"]) == (429, 429, "busy") and headers[b"retry-after"] == b"1"
        assert "limit 2" in body["error"]
        release.set()
        assert [r[0] for r in await asyncio.gather(*admitted)] == [200, 200]
        assert limit.in_flight == 0
        assert (await _call(limit))[0] == 200  # capacity is back

    asyncio.run(scenario())


def test_probes_and_metrics_are_never_shed():
    limit = ConcurrencyLimit(_ok, max_in_flight=1)
    limit.in_flight = 1  # saturated
    for path in ("/readyz", "/livez", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert asyncio.run(_call(limit, path, method="GET"))[0] == 200
    assert asyncio.run(_call(limit, "/explain"))[0] == 429
    assert asyncio.run(_call(limit, "/v2/models/fact/infer"))[0] == 429


def test_queue_shedding_matches_route_patterns():
    """KServe's explain route (a path pattern) is admitted by the same budget as /explain_batch."""
    backlog = ModelBacklog(initial_s=0.3)
    shed = QueueShedding(_ok, backlog, {re.compile(r"/v1/models/[^/]+:explain"): "explain_batch"}, budget_s=1.0)
    backlog.admit("explain_batch", 3)  # 0.9 s queued: one more does not fit
    status, _, body = asyncio.run(_call(shed, "/v1/models/fact:explain"))
    assert status == 503 and body["reason"] == "overloaded"
    assert asyncio.run(_call(shed, "/v1/models/fact:predict"))[0] == 200  # not a shed route


def test_queue_shedding_admits_within_the_budget_and_refuses_at_once_beyond():
    backlog = ModelBacklog(initial_s=0.3)
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await _ok(scope, receive, send)

    shed = QueueShedding(slow_app, backlog, {"/explain": "explain"}, budget_s=1.0)

    async def scenario():
        admitted = [asyncio.create_task(_call(shed, "/explain")) for _ in range(3)]  # 0, 0.3, 0.6 s queued: in
        await asyncio.sleep(0.01)
        assert backlog.backlog_s == pytest.approx(0.9)
        status, headers, body = await asyncio.wait_for(_call(shed, "/explain"), timeout=0.5)
        assert status == 503 and body["reason"] == "overloaded" and headers[b"retry-after"] == b"1"
        release.set()
        assert [r[0] for r in await asyncio.gather(*admitted)] == [200, 200, 200]
        backlog.admit("explain")  # a long queue again: other routes are not shed by it
        assert (await _call(shed, "/predict"))[0] == 200
        backlog.finish(0.3)
        assert backlog.backlog_s == pytest.approx(0.0)

    asyncio.run(scenario())
    backlog.observe("explain", 0.1)
    backlog.observe("explain", 0.2)
    assert backlog.cost("explain") == pytest.approx(0.8 * 0.1 + 0.2 * 0.2)


# ----------------------------------------------------------------------------- the request gate
class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image_base64: str
    top_k: StrictInt = 5
    layers: list[str] | None = None


def _gate(app=_ok, **kwargs) -> RequestGate:
    def decode(data: bytes) -> Image.Image:
        if data == b"bad":
            raise RequestError(400, "not_an_image", "not an image")
        return Image.new("RGB", (2, 2))

    options = {
        "routes": {
            "/explain": RouteSpec(_Schema, ("application/json",), lambda p: [p["image_base64"]], multipart=True)
        },
        "max_bytes": 1000,
        "body_timeout_s": 0.2,
        "decode": decode,
        "unbase64": lambda text: base64.b64decode(text),
        **kwargs,
    }
    return RequestGate(app, **options)


JSON = [(b"content-type", b"application/json")]


def test_gate_refuses_media_types_sizes_and_slow_bodies():
    gate = _gate()
    status, _, body = asyncio.run(_call(gate, "/explain", [(b"content-type", b"text/plain")], b"x"))
    assert (status, body["reason"], body["error"]) == (
        415,
        "unsupported_media_type",
        "Content-Type 'text/plain' is not supported by /explain: send application/json or multipart/form-data",
    )
    too_large = (413, "too_large", "request body exceeds the limit of 1000 bytes")
    status, _, body = asyncio.run(_call(gate, "/explain", [*JSON, (b"content-length", b"5000")], b"x"))
    assert (status, body["reason"], body["error"]) == too_large
    status, _, body = asyncio.run(_call(gate, "/explain", JSON, [b"x" * 600, b"x" * 600]))  # chunked, no length
    assert (status, body["reason"], body["error"]) == too_large
    status, _, body = asyncio.run(_call(gate, "/explain", [*JSON, (b"content-length", b"ten")], b"x"))
    assert (status, body["reason"], body["error"]) == (
        400,
        "bad_content_length",
        "the Content-Length header is not a number",
    )
    status, _, body = asyncio.run(_call(gate, "/explain", JSON, [b'{"image_base64"', b"never"], delay=5))
    assert (status, body["reason"], body["error"]) == (
        408,
        "body_timeout",
        "no request body data arrived for 0.2 s (is the Content-Length larger than the body?)",
    )
    assert asyncio.run(_call(gate, "/model", method="GET"))[0] == 200  # not a gated route


def test_gate_validates_strictly_and_names_the_field():
    gate = _gate()
    image = base64.b64encode(b"img").decode()
    cases = {  # payload → (reason, how the message starts)
        b"not json": ("invalid_json", "the request body is not valid JSON: "),
        b"[1, 2]": ("invalid_json", "the request body must be a JSON object, got list"),
        b"": ("empty_body", "the request body is empty: send a JSON object"),
        json.dumps({"image_base64": image, "topk": 3}).encode(): (
            "invalid_request",
            "invalid request: unknown field 'topk' (the fields are: image_base64, top_k, layers)",
        ),
        json.dumps({"image_base64": image, "top_k": True}).encode(): (
            "invalid_request",
            "invalid request: field 'top_k': ",
        ),
        json.dumps({"top_k": 3}).encode(): ("invalid_request", "invalid request: field 'image_base64' is required"),
    }
    for payload, (reason, message) in cases.items():
        status, _, body = asyncio.run(_call(gate, "/explain", JSON, payload))
        assert (status, body["status"], body["reason"]) == (400, 400, reason), (payload, body)
        assert body["error"].startswith(message), (payload, body)
    status, _, body = asyncio.run(_call(gate, "/explain", JSON, json.dumps({"image_base64": "YmFk"}).encode()))
    assert (status, body["reason"], body["error"]) == (400, "not_an_image", "not an image")  # the decoder's refusal


def test_gate_hands_decoded_images_and_translated_multipart_to_the_app():
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = json.loads(message["body"])
        seen["content_type"] = dict(scope["headers"])[b"content-type"]
        seen["image"] = decoded_image(seen["body"]["image_base64"])
        await _ok(scope, receive, send)

    gate = _gate(app)
    boundary = "bnd"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{"n" * 300}.png"\r\n\r\n'
        f'PIXELS\r\n--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="layers"\r\n\r\nlayer2, layer3\r\n--{boundary}--\r\n'
    ).encode()
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    assert asyncio.run(_call(gate, "/explain", headers, form))[0] == 200
    assert seen["body"] == {
        "image_base64": base64.b64encode(b"PIXELS").decode(),
        "top_k": 3,
        "layers": ["layer2", "layer3"],
    }
    assert seen["content_type"] == b"application/json" and isinstance(seen["image"], Image.Image)
    text_image = form.replace(b'; filename="' + b"n" * 300 + b'.png"', b"")
    status, _, body = asyncio.run(_call(gate, "/explain", headers, text_image))
    assert status == 400 and body["reason"] == "image_not_a_file"
    assert body["error"].startswith("the 'image' field is text, not a file: upload the file itself")


# ----------------------------------------------------------------------------- the edge
def _edge(app, **kwargs):
    counted, rejected = [], []
    edge = Edge(app, timeout_s=kwargs.pop("timeout_s", 5), on_request=lambda *a: counted.append(a),
                on_reject=lambda *a: rejected.append(a), **kwargs)  # fmt: skip
    return edge, counted, rejected


def test_edge_rewrites_foreign_errors_into_the_envelope_with_a_request_id():
    async def starlette_404(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Not Found"})

    async def bentoml_validation(scope, receive, send):
        body = json.dumps({"error": "1 validation error", "detail": [{"loc": ["top_k"], "msg": "bad int"}]}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def crash(scope, receive, send):
        raise RuntimeError("boom")

    async def queue_full(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b'{"error": "An unexpected error"}'})

    cases = (
        (starlette_404, 404, "not_found", "no such resource: POST /concepts/layer3/7 (the API is listed at /docs)"),
        (bentoml_validation, 400, "invalid_request", "invalid request: top_k: bad int"),
        (crash, 500, "internal_error", "an unexpected error occurred; quote the request_id"),  # not "boom"
        (queue_full, 503, "queue_full", "server overloaded: the batching queue is full; retry later"),
    )
    for app, status, reason, message in cases:
        edge, counted, rejected = _edge(app)
        got, headers, body = asyncio.run(_call(edge, "/concepts/layer3/7", [(b"x-request-id", b"abc-1")]))
        assert got == status and set(body) == {"error", "reason", "status", "request_id"}, body
        assert body["error"] == message and body["status"] == status, body
        assert body["reason"] == reason and body["request_id"] == "abc-1" and headers[b"x-request-id"] == b"abc-1"
        assert rejected == [("concepts/{layer}/{id}", reason)] and counted[0][:3] == (
            "concepts/{layer}/{id}",
            "POST",
            status,
        )
        if status == 503:
            assert headers[b"retry-after"] == b"1"


def test_edge_answers_the_deadline_and_labels_routes_boundedly():
    async def hang(scope, receive, send):
        await asyncio.sleep(3600)

    edge, counted, _ = _edge(hang, timeout_s=0.1)
    status, headers, body = asyncio.run(asyncio.wait_for(_call(edge, "/explain"), timeout=2))
    assert status == 504 and body["reason"] == "timeout" and len(headers[b"x-request-id"]) == 32
    assert body["error"] == "the request was not answered within 0.1 s" and body["status"] == 504
    assert (
        route_label("/junk/123") == "other" and route_label("/samples/" + "9" * 5000 + ".png") == "samples/{index}.png"
    )
    assert route_label("/concepts/layer3") == "concepts/{layer}" and route_label("/explain") == "explain"
