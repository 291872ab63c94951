"""ASGI middleware: refuse request bodies over a byte limit (413) and malformed multipart bodies (400).

Both happen before BentoML parses the request: an oversized body is never read into the
app, and a multipart body that does not parse would otherwise surface as a 500 from deep
inside the framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["BodySizeLimit"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Reject bodies larger than ``max_bytes`` (by ``Content-Length`` or while streaming).

    Args:
        app: the wrapped ASGI app.
        max_bytes: the limit.
        on_reject: called with the request path and the reason when a request is refused (metrics).
    """

    SKIP = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})
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
        body = json.dumps({"error": message, "reason": reason, "status": status}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

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
