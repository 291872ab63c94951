"""The request gate: every POST body is read, checked and its images decoded before BentoML sees it.

For each API route, in this order:

1. ``Content-Type`` must be one the route reads (else 415);
2. the body is read whole, bounded in bytes (413, also for chunked bodies without a
   ``Content-Length``) and in time between chunks (408: a ``Content-Length`` longer than
   the body does not hang the request until its deadline);
3. ``/explain``'s multipart form is translated into its JSON form (a text field ``image``
   is refused: BentoML would take it for a URL to download), so no BentoML file or URL
   input path ever runs and no client-chosen file name reaches the disk;
4. the JSON is validated against the route's strict schema (:mod:`service.schemas`), with
   a message that names the field;
5. the images are decoded on a thread pool, at most ``decode_concurrency`` at a time per
   worker (decoding never blocks the event loop, and concurrent decodes bound memory);
6. the (translated) JSON is replayed to BentoML, and the decoded images are handed to the
   endpoint through a context variable (:func:`decoded_image`), so nothing is decoded twice;
   the validated request model is in the scope too (:data:`VALIDATED`, for plain ASGI routes).

Routes are keyed by exact path, or by a compiled pattern that must match the whole path
(``/v2/models/{name}/infer`` and the like, :mod:`service.protocols`); exact paths win.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image
from pydantic import BaseModel, ValidationError

from service.errors import RequestError, send_error
from service.limits import WORK_UNITS, PathTable

__all__ = [
    "VALIDATED",
    "RequestGate",
    "RouteSpec",
    "decoded_image",
    "parse_json_object",
    "validated_request",
    "validation_message",
]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_DECODED: contextvars.ContextVar[dict[str, Image.Image] | None] = contextvars.ContextVar("fact_decoded", default=None)
_ASCII_INT = re.compile(r"[0-9]{1,9}")
_MULTIPART_LISTS = frozenset({"layers"})
_MULTIPART_INTS = frozenset({"top_k", "heatmap_size"})

VALIDATED = "fact.validated_request"
"""ASGI scope key: the route schema's instance validated from the body (set by the gate)."""


def decoded_image(text: str) -> Image.Image | None:
    """The image the gate decoded from this base64 text for the current request, if any."""
    table = _DECODED.get()
    return None if table is None else table.get(text)


def validated_request(scope: Scope) -> BaseModel:
    """The request model the gate validated for this scope (a route handler's typed body)."""
    model = scope.get(VALIDATED)
    if model is None:  # every gated route gets one: a missing model is a wiring bug, not a client error
        raise RuntimeError(f"the request gate did not validate this request ({scope.get('path')!r} is not gated)")
    return model


@dataclass(frozen=True)
class RouteSpec:
    """What the gate checks for one route.

    Attributes:
        schema: the strict pydantic model of the JSON body.
        media_types: accepted ``Content-Type`` media types.
        images: body → the base64 strings of its images, in order.
        multipart: whether a multipart form is accepted (translated into the JSON form).
        work_units: body → its model work in units (admission control, :class:`service.limits.ModelBacklog`).
    """

    schema: type[BaseModel]
    media_types: tuple[str, ...]
    images: Callable[[dict[str, Any]], list[str]]
    multipart: bool = False
    work_units: Callable[[dict[str, Any]], int] | None = None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (400 ``empty_body`` / ``invalid_json`` otherwise)."""
    if not body.strip():
        raise RequestError(400, "empty_body", "the request body is empty: send a JSON object")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "invalid_json", f"the request body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "invalid_json", f"the request body must be a JSON object, got {type(payload).__name__}")
    return payload


def validation_message(err: ValidationError, schema: type[BaseModel]) -> str:
    """A pydantic error as one sentence naming each bad field (unknown fields listed with the known ones)."""
    parts = []
    for item in err.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "body"
        if not item["loc"]:  # a whole-body check: its message names the fields itself
            parts.append(item["msg"])
        elif item["type"] == "extra_forbidden" and len(item["loc"]) == 1:
            known = ", ".join(schema.model_fields)
            parts.append(f"unknown field {where!r} (the fields are: {known})")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif item["type"] == "missing":
            parts.append(f"field {where!r} is required")
        else:
            parts.append(f"field {where!r}: {item['msg']}")
    more = f" (and {err.error_count() - 5} more)" if err.error_count() > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


class RequestGate:
    """ASGI middleware doing the six steps of the module docstring for the routes in ``routes``.

    Args:
        app: the wrapped ASGI app.
        routes: exact path or compiled pattern (matched against the whole path) → :class:`RouteSpec`.
        max_bytes: largest body (413 above it).
        body_timeout_s: longest wait for the next chunk of a body (408 after it).
        decode: image bytes (already base64-decoded) → a decoded image, or a ``RequestError``.
        unbase64: base64 text → bytes, or a ``RequestError``.
        decode_concurrency: images decoded at once in this worker.
    """

    DRAIN_FACTOR = 8
    """A body up to this many times the limit is read and discarded before the 413, so the client
    (still sending) sees the answer instead of a reset connection; a larger one is cut off."""

    def __init__(
        self,
        app: Any,
        routes: Mapping[str | re.Pattern[str], RouteSpec],
        max_bytes: int,
        body_timeout_s: float,
        decode: Callable[[bytes], Image.Image],
        unbase64: Callable[[str], bytes],
        decode_concurrency: int = 2,
    ) -> None:
        self.app = app
        self.routes = PathTable(routes)
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.decode = decode
        self.unbase64 = unbase64
        self._decoding = asyncio.Semaphore(decode_concurrency)
        self._pool = ThreadPoolExecutor(max_workers=decode_concurrency, thread_name_prefix="fact-decode")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = self._spec(scope.get("path", "")) if scope["type"] == "http" else None
        if spec is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            media_type = self._media_type(scope, spec)
            body = await self._read_body(scope, receive)
            if media_type == "multipart/form-data":
                payload = await self._multipart_to_json(scope, body)
            else:
                payload = self._parse_json(body)
            validated = spec.schema.model_validate(payload)
        except RequestError as err:
            await send_error(send, err)
            return
        except ValidationError as err:
            await send_error(send, RequestError(400, "invalid_request", validation_message(err, spec.schema)))
            return
        try:
            images = await self._decode_all(spec.images(payload))
        except RequestError as err:
            await send_error(send, err)
            return
        replay = json.dumps(payload).encode() if media_type == "multipart/form-data" else body
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(replay)).encode())]
        replayed = False

        async def replay_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": replay, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as a server would

        token = _DECODED.set(images)
        try:
            units = spec.work_units(payload) if spec.work_units is not None else 1
            scope = {**scope, "headers": headers, WORK_UNITS: units, VALIDATED: validated}
            await self.app(scope, replay_receive, send)
        finally:
            _DECODED.reset(token)

    def _spec(self, path: str) -> RouteSpec | None:
        return self.routes.get(path)

    # ------------------------------------------------------------------ steps
    def _media_type(self, scope: Scope, spec: RouteSpec) -> str:
        raw = dict(scope.get("headers", [])).get(b"content-type")
        media_type = raw.decode("latin-1").split(";")[0].strip().lower() if raw else "application/json"
        accepted = spec.media_types + (("multipart/form-data",) if spec.multipart else ())
        if media_type not in accepted:
            wanted = " or ".join(accepted)
            raise RequestError(
                415,
                "unsupported_media_type",
                f"Content-Type {media_type!r} is not supported by {scope['path']}: send {wanted}",
            )
        return media_type

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise RequestError(400, "bad_content_length", "the Content-Length header is not a number") from None
        if declared is not None and declared > self.max_bytes:
            if declared <= self.DRAIN_FACTOR * self.max_bytes:
                await self._drain(receive)
            raise RequestError(413, "too_large", f"request body exceeds the limit of {self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await self._next(receive)
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client_disconnected", "the client went away before sending the body")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                if size <= self.DRAIN_FACTOR * self.max_bytes and message.get("more_body", False):
                    await self._drain(receive)
                raise RequestError(413, "too_large", f"request body exceeds the limit of {self.max_bytes} bytes")
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _next(self, receive: Receive) -> Message:
        try:
            return await asyncio.wait_for(receive(), timeout=self.body_timeout_s)
        except TimeoutError:
            raise RequestError(
                408,
                "body_timeout",
                f"no request body data arrived for {self.body_timeout_s:g} s "
                "(is the Content-Length larger than the body?)",
            ) from None

    async def _drain(self, receive: Receive) -> None:
        drained = 0
        while drained <= self.DRAIN_FACTOR * self.max_bytes:
            try:
                message = await self._next(receive)
            except RequestError:
                return
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    @staticmethod
    def _parse_json(body: bytes) -> dict[str, Any]:
        return parse_json_object(body)

    async def _multipart_to_json(self, scope: Scope, body: bytes) -> dict[str, Any]:
        """A multipart form → the route's JSON form (file ``image`` → ``image_base64``; ``top_k`` → int)."""
        import base64

        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(Headers(scope=scope), stream(), max_files=1, max_fields=32).parse()
        except (MultiPartException, ValueError, KeyError) as err:
            raise RequestError(
                400, "malformed_multipart", f"the multipart/form-data body is malformed: {err}"
            ) from None
        payload: dict[str, Any] = {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "image":
                        raise RequestError(
                            400, "invalid_request", f"unexpected file field {name!r}: send the file as 'image'"
                        )
                    data = await value.read()
                    if not data:
                        raise RequestError(400, "empty_image", "the uploaded file 'image' is empty")
                    payload["image_base64"] = base64.b64encode(data).decode()
                elif name == "image":
                    raise RequestError(
                        400,
                        "image_not_a_file",
                        "the 'image' field is text, not a file: upload the file itself "
                        "(curl -F image=@photo.png), or send JSON with image_base64",
                    )
                elif name in _MULTIPART_LISTS:
                    payload.setdefault(name, []).extend(v.strip() for v in value.split(",") if v.strip())
                elif name in payload:
                    raise RequestError(400, "invalid_request", f"field {name!r} is given more than once")
                elif name in _MULTIPART_INTS:
                    if not _ASCII_INT.fullmatch(value.strip()):
                        raise RequestError(
                            400, "invalid_request", f"field {name!r} must be an integer, got {value[:40]!r}"
                        )
                    payload[name] = int(value)
                else:
                    payload[name] = value
        finally:
            await form.close()
        if "image_base64" not in payload:
            raise RequestError(400, "no_image", "send a multipart file 'image' (or JSON with image_base64)")
        return payload

    async def _decode_all(self, texts: list[str]) -> dict[str, Image.Image]:
        loop = asyncio.get_running_loop()
        decoded: dict[str, Image.Image] = {}
        for text in texts:
            if text in decoded:
                continue
            async with self._decoding:
                decoded[text] = await loop.run_in_executor(self._pool, self._decode_one, text)
        return decoded

    def _decode_one(self, text: str) -> Image.Image:
        return self.decode(self.unbase64(text))
