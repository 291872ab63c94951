"""The one error contract of the service: ``{"error", "reason", "status", "request_id"}``.

Every error response of every route — ours, BentoML's and Starlette's — has this body
(``service.edge.Edge`` rewrites any other error body into it). ``reason`` is a stable
machine-readable token (it also labels ``fact_rejected_requests_total``); ``error`` is a
sentence a caller can act on.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus

from starlette.responses import Response

__all__ = [
    "REASON_BY_STATUS",
    "RequestError",
    "error_body",
    "error_payload",
    "error_response",
    "parse_path_id",
    "send_error",
]

REASON_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "busy",
    500: "internal_error",
    503: "unavailable",
    504: "timeout",
}
"""The reason given to an error whose producer (BentoML, Starlette) named none."""


class RequestError(Exception):
    """A refused request: an HTTP status, a ``reason`` token and a ``message`` for the caller.

    ``headers`` are added to the response (e.g. ``Retry-After`` on 429/503).
    """

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = dict(headers or {})


def error_payload(status: int, reason: str | None, message: str, request_id: str | None = None) -> dict[str, object]:
    """The error body as a dict (``reason`` defaults from the status)."""
    if not reason:
        reason = REASON_BY_STATUS.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
    payload: dict[str, object] = {"error": message, "reason": reason, "status": status}
    if request_id is not None:
        payload["request_id"] = request_id
    return payload


def error_body(status: int, reason: str | None, message: str, request_id: str | None = None) -> bytes:
    """The error body as JSON bytes."""
    return json.dumps(error_payload(status, reason, message, request_id)).encode()


def error_response(err: RequestError) -> Response:
    """``err`` as the response a route handler returns (the edge adds its request id)."""
    return Response(
        error_body(err.status, err.reason, err.message),
        status_code=err.status,
        media_type="application/json",
        headers=err.headers,
    )


async def send_error(send, err: RequestError) -> None:
    """Send ``err`` as a whole ASGI response (status, JSON envelope, its headers)."""
    body = error_body(err.status, err.reason, err.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_PATH_ID = re.compile(r"[0-9]{1,9}")


def parse_path_id(text: str, what: str, reason: str) -> int:
    """A non-negative integer id from a URL path segment (ASCII digits, at most 9), or a 404 naming it.

    Starlette's ``{x:int}`` converter hands ``int()`` any run of digits, and a few thousand
    digits cost seconds (CPython's int-digits limit then fails with a 500); ids here are small.
    """
    if not _PATH_ID.fullmatch(text):
        raise RequestError(404, reason, f"{what} {text[:40]!r} is not a valid id: use a non-negative integer")
    return int(text)
