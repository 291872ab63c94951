"""The service's ASGI limits in isolation (no server): load shedding and its rejection counts."""

from __future__ import annotations

import asyncio
import json

from service.limits import ConcurrencyLimit, MediaTypeGuard


async def _call(middleware, path: str = "/predict", headers: list | None = None) -> tuple[int, dict, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or []}
    await middleware(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body) if body else {}


def test_concurrency_limit_sheds_at_once_and_counts_by_reason():
    release = asyncio.Event()
    rejections: list[tuple[str, str]] = []

    async def slow_app(scope, receive, send):
        await release.wait()
        status = 503 if scope["path"] == "/overloaded" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limit = ConcurrencyLimit(slow_app, 2, on_reject=lambda path, reason: rejections.append((path, reason)))

    async def scenario():
        admitted = [asyncio.create_task(_call(limit)), asyncio.create_task(_call(limit, "/overloaded"))]
        await asyncio.sleep(0.01)
        assert limit.in_flight == 2
        status, headers, body = await asyncio.wait_for(_call(limit), timeout=1)  # answered without waiting
        assert status == 429 and body["reason"] == "busy" and headers[b"retry-after"] == b"1"
        assert "limit 2" in body["error"]
        release.set()
        results = await asyncio.gather(*admitted)
        assert [r[0] for r in results] == [200, 503]
        assert limit.in_flight == 0
        assert (await _call(limit))[0] == 200  # capacity is back

    asyncio.run(scenario())
    assert rejections == [("/predict", "busy"), ("/overloaded", "queue_full")]


def test_probes_and_metrics_are_never_shed():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limit = ConcurrencyLimit(app, max_in_flight=1)
    limit.in_flight = 1  # saturated
    for path in ("/readyz", "/livez", "/metrics"):
        assert asyncio.run(_call(limit, path))[0] == 200
    assert asyncio.run(_call(limit, "/explain"))[0] == 429


def test_media_type_guard_names_what_the_endpoint_reads():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    rejections = []
    guard = MediaTypeGuard(
        app,
        {"/predict": ("application/json",), "/explain": ("application/json", "multipart/form-data")},
        on_reject=lambda path, reason: rejections.append((path, reason)),
    )
    status, _, body = asyncio.run(_call(guard, "/predict", [(b"content-type", b"text/plain; charset=utf-8")]))
    assert status == 415 and body["reason"] == "unsupported_media_type"
    assert "'text/plain'" in body["error"] and "application/json" in body["error"]
    assert rejections == [("/predict", "unsupported_media_type")]
    multipart = [(b"content-type", b"multipart/form-data; boundary=x")]
    assert asyncio.run(_call(guard, "/explain", multipart))[0] == 200
    assert asyncio.run(_call(guard, "/explain", [(b"content-type", b"Application/JSON")]))[0] == 200
    assert asyncio.run(_call(guard, "/predict"))[0] == 200  # no Content-Type: left to the endpoint
    assert asyncio.run(_call(guard, "/model", [(b"content-type", b"text/plain")]))[0] == 200  # not guarded
