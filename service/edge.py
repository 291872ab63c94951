"""The service's outermost ASGI layer: request ids, one error shape, a deadline, bounded metrics, one log line.

Everything a response can be — ours, BentoML's (validation ``detail`` lists, its generic
500/503), Starlette's plain-text 404/405, an exception nobody caught, a request that runs
past its deadline — leaves through :class:`Edge`, which

* serves every route of our own API also under ``/v1/…`` (``/v1/predict`` is ``/predict``):
  the path is rewritten before anything else sees it, so metrics, gate and routing know one
  route (:func:`canonical_path`; ``/v1/models…`` is KServe's V1 protocol and is left alone);
* gives every request an id (the caller's ``X-Request-ID`` when it is sane, else the trace
  id of a W3C ``traceparent``, else a new one), echoes it as ``X-Request-ID`` on every
  response and puts it in every log record of the request (:func:`current_request_id`);
* rewrites any error body that is not already ``{"error", "reason", "status"}`` into that
  shape (:mod:`service.errors`), adding ``request_id`` (extra fields of our own envelope, such
  as a readiness probe's ``"ready": false``, are kept);
* answers 504 in that shape when the request is not answered within its deadline;
* counts requests by **route template** (``/concepts/{layer}/{id}``, unknown paths as
  ``other``), so that junk URLs cannot grow ``/metrics`` — BentoML's own per-path traffic
  metrics are switched off for that reason (``service.service``);
* counts every refusal in ``fact_rejected_requests_total`` by route and reason;
* logs one line per client error (INFO; 429/503 at WARNING) and a traceback only for 5xx.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from service.errors import error_body, error_payload

__all__ = ["BENTOML_REQUEST_LOGGER", "Edge", "QuietRefusals", "canonical_path", "current_request_id", "route_label"]

log = logging.getLogger("fact.service.edge")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("fact_request_id", default=None)
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_ERROR_BODY = 64 * 1024  # error bodies are small; a larger one is cut before it is rewritten
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

ROUTES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), label)
    for pattern, label in (
        (r"/explain", "explain"),
        (r"/explain_batch", "explain_batch"),
        (r"/predict", "predict"),
        (r"/intervene", "intervene"),
        (r"/model", "model"),
        (r"/concepts/[^/]+", "concepts/{layer}"),
        (r"/concepts/[^/]+/[^/]+", "concepts/{layer}/{id}"),
        (r"/samples", "samples"),
        (r"/samples/[^/]+", "samples/{index}.png"),
        (r"/static/.+", "static/{file}"),
        (r"/", "root"),
        (r"/docs", "docs"),
        (r"/docs\.json", "docs.json"),
        (r"/(livez|healthz|readyz|metrics)", "probe"),
        # KServe V1 (service.protocols); a model name has no ':' there, so the verbs come first
        (r"/v1/models", "v1/models"),
        (r"/v1/models/[^/:]+:predict", "v1/models/{name}:predict"),
        (r"/v1/models/[^/:]+:explain", "v1/models/{name}:explain"),
        (r"/v1/models/[^/]+", "v1/models/{name}"),
        # Open Inference Protocol V2
        (r"/v2", "v2"),
        (r"/v2/health/(live|ready)", "v2/health"),
        (r"/v2/models/[^/]+(/versions/[^/]+)?", "v2/models/{name}"),
        (r"/v2/models/[^/]+(/versions/[^/]+)?/ready", "v2/models/{name}/ready"),
        (r"/v2/models/[^/]+(/versions/[^/]+)?/infer", "v2/models/{name}/infer"),
    )
)
"""Path → the route label of metrics and logs; anything else is ``other``."""


def route_label(path: str) -> str:
    """The bounded label of ``path``: its route template, or ``other``."""
    for pattern, label in ROUTES:
        if pattern.fullmatch(path):
            return label
    return "other"


_VERSIONED = re.compile(r"/v1(/.+)")
_KSERVE_V1 = re.compile(r"/models(/.*)?|/models:.*")


def canonical_path(path: str) -> str:
    """``path`` without the ``/v1`` version prefix of our own API (``/v1/explain`` → ``/explain``).

    KServe's ``/v1/models…`` paths are another protocol's and stay as they are.
    """
    match = _VERSIONED.fullmatch(path)
    if match is None or _KSERVE_V1.fullmatch(match.group(1)):
        return path
    return match.group(1)


def current_request_id() -> str | None:
    """The id of the request being served in this task (None outside a request)."""
    return _REQUEST_ID.get()


BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"
"""The logger BentoML logs every failed API call to, at ERROR with a traceback."""


class QuietRefusals(logging.Filter):
    """Drops BentoML's traceback for a deliberate refusal (a 4xx or its batching queue's 503).

    :class:`Edge` logs one line for each of those; a traceback stays only for real errors.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        error = record.exc_info[1]
        code = getattr(getattr(error, "error_code", None), "value", None)
        if isinstance(code, int) and (code < 500 or code == 503):
            return False
        return type(error).__name__ != "ValidationError"


def _request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    values = {name.lower(): value for name, value in headers}
    given = values.get(b"x-request-id", b"").decode("latin-1").strip()
    if _SANE_ID.fullmatch(given):
        return given
    match = _TRACEPARENT.fullmatch(values.get(b"traceparent", b"").decode("latin-1").strip().lower())
    if match and match.group(1) != "0" * 32:
        return match.group(1)
    return uuid.uuid4().hex


def _validation_message(detail: list[Any]) -> str:
    """A pydantic error list (BentoML's ``detail``) as one sentence naming the fields."""
    parts = []
    for item in detail[:5]:
        if isinstance(item, dict):
            where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body",)) or "request"
            parts.append(f"{where}: {item.get('msg', 'invalid')}")
    more = f" (and {len(detail) - 5} more)" if len(detail) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more if parts else "invalid request"


_PROBES = frozenset({"/livez", "/healthz", "/readyz"})
_READINESS_ROUTES = frozenset({"v1/models/{name}", "v2/health", "v2/models/{name}/ready"})
"""Protocol readiness probes: their 503 while the model loads is an answer, not an incident (not logged)."""


def _foreign_error(status: int, parsed: Any, body: bytes, method: str, path: str) -> tuple[str | None, str]:
    """``(reason, message)`` for an error body that is not ours (BentoML's, Starlette's)."""
    if isinstance(parsed, dict) and isinstance(parsed.get("detail"), list):
        return "invalid_request", _validation_message(parsed["detail"])
    if status == 404:
        return "not_found", f"no such resource: {method} {path[:200]} (the API is listed at /docs)"
    if status == 405:
        return "method_not_allowed", f"{method} is not allowed on {path[:200]}"
    if status == 503 and path in _PROBES:
        return "not_ready", "the service is not ready: the model is loading or failed to load (see the log)"
    if status == 503:
        # BentoML's batching queue: the request would not be served within its latency budget.
        return "queue_full", "server overloaded: the batching queue is full; retry later"
    if status >= 500:
        return None, "an unexpected error occurred; the server log has the details (quote the request_id)"
    text = parsed.get("error") if isinstance(parsed, dict) else body.decode("utf-8", "replace").strip()
    return None, str(text or "bad request")[:500]


def _envelope(status: int, body: bytes, method: str, path: str) -> dict[str, Any]:
    """The one error shape of an error body produced anywhere in the stack (ours is kept as it is)."""
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict) and {"error", "reason", "status"} <= parsed.keys():
        return parsed
    return error_payload(status, *_foreign_error(status, parsed, body, method, path))


class Edge:
    """Outermost ASGI middleware of the service (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        timeout_s: deadline of a request in seconds (504 after it).
        on_request: called with ``(route, method, status, seconds)`` once per answered request.
        on_reject: called with ``(route, reason)`` for every error response.
        retry_after: ``Retry-After`` seconds added to 429/503 answers that carry none.
    """

    def __init__(
        self,
        app: Any,
        timeout_s: float,
        on_request: Callable[[str, str, int, float], None] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        retry_after: int = 1,
    ) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.on_request = on_request
        self.on_reject = on_reject
        self.retry_after = retry_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope.get("headers", []))
        path = canonical_path(scope.get("path", ""))
        if path != scope.get("path"):
            scope = {**scope, "path": path, "raw_path": path.encode()}
        token = _REQUEST_ID.set(request_id)
        try:
            await self._serve(scope, receive, send, request_id)
        finally:
            _REQUEST_ID.reset(token)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        started = time.perf_counter()
        method = scope.get("method", "GET")
        method_label = method if method in _METHODS else "OTHER"
        path = scope.get("path", "")
        route = route_label(path)
        state = {"status": 0, "sent": False}
        pending: dict[str, Any] = {}  # an error response being buffered for rewriting

        async def finish_error(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
            rewritten = _envelope(status, body, method, path)
            reason = str(rewritten["reason"])
            payload = error_payload(int(rewritten["status"]), reason, str(rewritten["error"]), request_id)
            payload.update({k: v for k, v in rewritten.items() if k not in payload and k != "request_id"})
            data = json.dumps(payload).encode()
            kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
            if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in kept):
                kept.append((b"retry-after", str(self.retry_after).encode()))
            kept += [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
            quiet = path in _PROBES or (status == 503 and route in _READINESS_ROUTES)
            if not quiet:  # a probe's 503 while loading is its answer, not an incident
                self._log(status, reason, str(rewritten["error"]), method, path, request_id)
            if self.on_reject is not None:
                self.on_reject(route, reason)
            await send({"type": "http.response.start", "status": status, "headers": kept})
            await send({"type": "http.response.body", "body": data})

        async def edge_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                state["status"] = status
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if status >= 400:
                    pending.update(status=status, headers=headers, body=b"")
                    return
                state["sent"] = True
                await send({**message, "headers": headers})
                return
            if message["type"] == "http.response.body" and pending:
                if len(pending["body"]) < _MAX_ERROR_BODY:
                    pending["body"] += message.get("body", b"")[:_MAX_ERROR_BODY]
                if not message.get("more_body", False):
                    state["sent"] = True
                    headers, body = pending.pop("headers"), pending.pop("body")
                    await finish_error(pending.pop("status"), headers, body)
                return
            await send(message)

        async def answer(status: int, reason: str, message: str) -> None:
            state["status"] = status
            state["sent"] = True
            headers = [(b"x-request-id", request_id.encode())]
            await finish_error(status, headers, error_body(status, reason, message))

        task = asyncio.ensure_future(self.app(scope, receive, edge_send))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.timeout_s)
        except TimeoutError:
            task.cancel()
            if not state["sent"]:
                await answer(504, "timeout", f"the request was not answered within {self.timeout_s:g} s")
        except asyncio.CancelledError:
            task.cancel()
            raise
        except Exception:
            log.exception("unhandled error on %s %s [request_id=%s]", method, path[:200], request_id)
            if not state["sent"]:
                await answer(500, "internal_error", "an unexpected error occurred; quote the request_id")
        if self.on_request is not None and state["status"]:
            self.on_request(route, method_label, state["status"], time.perf_counter() - started)

    @staticmethod
    def _log(status: int, reason: str, message: str, method: str, path: str, request_id: str) -> None:
        level = logging.ERROR if status >= 500 and status not in (503, 504) else logging.INFO
        if status in (429, 503, 504):
            level = logging.WARNING
        log.log(
            level, "%s %s → %d %s: %s [request_id=%s]", method, path[:200], status, reason, message[:300], request_id
        )
