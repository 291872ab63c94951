"""ASGI middleware: shed load early (429), refuse bodies over a byte limit (413) and malformed multipart (400).

All of it happens before BentoML parses the request: a request over the concurrency limit
is answered at once instead of queueing behind work the server cannot finish in time, an
oversized body is never read into the app, and a multipart body that does not parse would
otherwise surface as a 500 from deep inside the framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["BodySizeLimit", "ConcurrencyLimit", "MediaTypeGuard"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


PROBES = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})
"""Probe and metrics paths: never shed or size-checked."""


class _TooLarge(Exception):
    pass


async def _json_response(send: Send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


class ConcurrencyLimit:
    """Answer 429 at once when ``max_in_flight`` requests are already being served (per worker process).

    Without it, a request storm queues: BentoML's batching refuses with 503 only after the
    request was read and validated, which under a 4× storm came 6–20 s late (docs/LOAD.md).
    Also counts the 503s the batching queue sends (``reason="queue_full"``), so every
    overload refusal is in ``fact_rejected_requests_total`` by reason.

    Args:
        app: the wrapped ASGI app.
        max_in_flight: concurrent requests admitted; 0 disables the limit.
        on_reject: called with the request path and the reason of each refusal (metrics).
    """

    SKIP = PROBES

    def __init__(self, app: Any, max_in_flight: int, on_reject: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.on_reject = on_reject
        self.in_flight = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.SKIP:
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            if self.on_reject:
                self.on_reject(path, "busy")
            message = f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight}); retry later"
            await _json_response(
                send, 429, {"error": message, "reason": "busy", "status": 429}, [(b"retry-after", b"1")]
            )
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503 and self.on_reject:
                self.on_reject(path, "queue_full")
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.in_flight -= 1


class MediaTypeGuard:
    """Answer 415 with a clear message when a POST's ``Content-Type`` is not one its endpoint reads.

    Without it, BentoML tries to parse e.g. a ``text/plain`` body as JSON and answers 400
    "invalid JSON", which hides the real mistake. Requests without a ``Content-Type`` pass.

    Args:
        app: the wrapped ASGI app.
        accepted: path → accepted media types (e.g. ``{"/predict": ("application/json",)}``).
        on_reject: called with the request path and the reason of each refusal (metrics).
    """

    def __init__(
        self, app: Any, accepted: dict[str, tuple[str, ...]], on_reject: Callable[[str, str], None] | None = None
    ) -> None:
        self.app = app
        self.accepted = accepted
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope.get("method") == "POST" and path in self.accepted:
            raw = dict(scope.get("headers", [])).get(b"content-type")
            media_type = raw.decode("latin-1").split(";")[0].strip().lower() if raw else ""
            if media_type and media_type not in self.accepted[path]:
                if self.on_reject:
                    self.on_reject(path, "unsupported_media_type")
                wanted = " or ".join(self.accepted[path])
                message = f"Content-Type {media_type!r} is not supported by {path}: send {wanted}"
                await _json_response(send, 415, {"error": message, "reason": "unsupported_media_type", "status": 415})
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Reject bodies larger than ``max_bytes`` (by ``Content-Length`` or while streaming).

    Args:
        app: the wrapped ASGI app.
        max_bytes: the limit.
        on_reject: called with the request path and the reason when a request is refused (metrics).
    """

    SKIP = PROBES
    DRAIN_FACTOR = 8
    """Bodies up to this many times the limit are read and discarded before the 413, so that the
    client, still sending, sees the response instead of a connection reset; larger ones are cut off."""

    @staticmethod
    async def _drain(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    def __init__(self, app: Any, max_bytes: int, on_reject: Callable[[str, str], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def _refuse(
        self, scope: Scope, send: Send, status: int = 413, reason: str = "too_large", message: str = ""
    ) -> None:
        if self.on_reject is not None:
            self.on_reject(scope.get("path", ""), reason)
        message = message or f"request body exceeds the limit of {self.max_bytes} bytes"
        await _json_response(send, status, {"error": message, "reason": reason, "status": status})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.SKIP:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    if declared <= self.DRAIN_FACTOR * self.max_bytes:
                        await self._drain(receive)
                    await self._refuse(scope, send)
                    return
        content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
        if content_type.startswith(b"multipart/form-data"):
            await self._guard_multipart(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, send)

    async def _guard_multipart(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the (bounded) multipart body, check that it parses, then replay it to the app."""
        from starlette.datastructures import Headers
        from starlette.formparsers import MultiPartException, MultiPartParser

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        async def stream():
            yield body

        try:
            form = await MultiPartParser(Headers(scope=scope), stream()).parse()
            await form.close()
        except (MultiPartException, ValueError, KeyError) as err:
            await self._refuse(
                scope, send, 400, "malformed_multipart", f"the multipart/form-data body is malformed: {err}"
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
