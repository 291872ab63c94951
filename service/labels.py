"""HTTP routes of the concept label store (:mod:`fact_model.concept_labels`), independent of BentoML.

* ``GET /concepts/{layer}/{concept}/label``: the label with its history (404 ``no_label``);
* ``PUT /concepts/{layer}/{concept}/label``: set it, body
  ``{"label": str, "note": str?, "expected_version": int?, "author": str?}``;
* ``DELETE /concepts/{layer}/{concept}/label?expected_version=N&author=NAME`` (both optional):
  delete it (the history is kept);
* ``GET /labels``: the whole document (export);
* ``PUT /labels?mode=merge|replace``: import a document (default ``merge``).

Reads are open. Writes need ``Authorization: Bearer <FACT_ADMIN_TOKEN>`` (:func:`admin_check`);
without a configured token they are refused with 403 ``writes_disabled``. The caller is
authenticated before its body is read. Write bodies must be JSON (415 otherwise), are read
bounded (413: ``Content-Length`` first, then the bytes actually streamed) and are validated
strictly (400 naming unknown or mistyped fields). Store errors map to statuses in
:data:`STATUS_OF`; every error body is :func:`service.errors.error_response`'s envelope.
Store calls (file I/O, a lock that may be held by another worker) run off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fact_model.concept_labels import (
    CorruptLabels,
    InvalidLabel,
    LabelConflict,
    LabelError,
    LabelNotFound,
    LabelStore,
    LabelStoreBusy,
    LabelStoreUnwritable,
    StaleLabels,
    UnknownConcept,
    UnknownLayer,
)
from service.errors import RequestError, error_response, parse_path_id
from service.gate import parse_json_object, validation_message

__all__ = ["STATUS_OF", "LabelPut", "admin_check", "label_routes", "read_json_body"]

STATUS_OF: dict[type[LabelError], tuple[int, str]] = {
    UnknownLayer: (404, "unknown_layer"),
    UnknownConcept: (404, "unknown_concept"),
    LabelNotFound: (404, "no_label"),
    InvalidLabel: (400, "invalid_label"),
    LabelConflict: (409, "label_conflict"),
    StaleLabels: (409, "stale_labels"),
    CorruptLabels: (500, "labels_corrupt"),
    LabelStoreUnwritable: (500, "labels_unwritable"),
    LabelStoreBusy: (503, "labels_busy"),
}
"""Store error → (HTTP status, reason)."""

_JSON_TYPES = ("application/json",)
_ASCII_INT = re.compile(r"[0-9]{1,9}")
_DIGITS = re.compile(r"[0-9]+")


class LabelPut(BaseModel):
    """Body of ``PUT /concepts/{layer}/{concept}/label`` (strict: no coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    label: str
    note: str = ""
    expected_version: int | None = None
    author: str | None = None


def admin_check(authorization_header: str | None, admin_token: str | None) -> None:
    """Allow a write only with ``Authorization: Bearer <admin_token>``.

    Raises:
        RequestError: 403 ``writes_disabled`` when no token is configured; 401 ``unauthorized``
            (with ``WWW-Authenticate: Bearer``) when the header is missing or not a bearer
            token; 403 ``forbidden`` when the token is wrong.
    """
    if not admin_token:
        raise RequestError(
            403,
            "writes_disabled",
            "label writes are disabled on this server: the operator must set FACT_ADMIN_TOKEN to enable them "
            "(reads stay open)",
        )
    scheme, _, token = (authorization_header or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise RequestError(
            401,
            "unauthorized",
            "label writes need the header 'Authorization: Bearer <admin token>'",
            {"WWW-Authenticate": 'Bearer realm="fact"'},
        )
    # Bytes, so a non-ASCII header is compared (and refused) instead of raising TypeError.
    if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), admin_token.encode("utf-8")):
        raise RequestError(403, "forbidden", "the bearer token is not the admin token")


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, read bounded.

    Raises:
        RequestError: 415 for a non-JSON ``Content-Type`` (a missing one is read as JSON), 400 for
            a bad ``Content-Length``, an empty body or invalid JSON, 413 above ``max_bytes``
            (declared or streamed).
    """
    raw_type = request.headers.get("content-type")
    media_type = raw_type.split(";")[0].strip().lower() if raw_type else "application/json"
    if media_type not in _JSON_TYPES:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type!r} is not supported by {request.url.path}: send application/json",
        )
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not _DIGITS.fullmatch(declared):
            raise RequestError(400, "bad_content_length", "the Content-Length header is not a number")
        if len(declared) > 18 or int(declared) > max_bytes:
            raise RequestError(413, "too_large", f"request body exceeds the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, "too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return parse_json_object(b"".join(chunks))


def _request_error(err: LabelError) -> RequestError:
    for kind in type(err).__mro__:
        if kind in STATUS_OF:
            status, reason = STATUS_OF[kind]
            headers = {"Retry-After": "1"} if status == 503 else None
            return RequestError(status, reason, str(err), headers)
    return RequestError(400, "invalid_label", str(err))


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload).encode(), status_code=status, media_type="application/json")


def _query_version(request: Request) -> int | None:
    raw = request.query_params.get("expected_version")
    if raw is None:
        return None
    if not _ASCII_INT.fullmatch(raw):
        raise RequestError(400, "invalid_request", f"expected_version {raw[:40]!r} must be a non-negative integer")
    return int(raw)


def label_routes(
    store: Callable[[], Awaitable[LabelStore]], admin_token: str | None, max_body_bytes: int
) -> list[Route]:
    """The label routes (module docstring), for a Starlette app's ``routes``.

    Args:
        store: async getter of the label store (it may raise a :class:`RequestError`, e.g. 503 while
            the model loads).
        admin_token: the bearer token that allows writes (None or empty: writes disabled).
        max_body_bytes: largest write body (413 above it).
    """

    async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except LabelError as err:
            raise _request_error(err) from None

    def concept_of(request: Request, labels: LabelStore) -> tuple[str, int]:
        layer = request.path_params["layer"]
        concept = parse_path_id(request.path_params["concept"], "concept", "unknown_concept")
        try:
            labels.check_concept(layer, concept)
        except LabelError as err:
            raise _request_error(err) from None
        return layer, concept

    def authorise(request: Request) -> None:
        admin_check(request.headers.get("authorization"), admin_token)

    async def get_label(request: Request) -> Response:
        try:
            labels = await store()
            layer, concept = concept_of(request, labels)
            found = await run(labels.get, layer, concept)
            if found is None:
                problem = await run(labels.problem)
                why = f" (labels are not served: {problem})" if problem else ""
                raise RequestError(404, "no_label", f"{layer} concept {concept} has no label{why}")
        except RequestError as err:
            return error_response(err)
        return _json(found.to_dict())

    async def put_label(request: Request) -> Response:
        try:
            authorise(request)
            labels = await store()
            layer, concept = concept_of(request, labels)
            payload = await read_json_body(request, max_body_bytes)
            try:
                body = LabelPut.model_validate(payload)
            except ValidationError as err:
                raise RequestError(400, "invalid_request", validation_message(err, LabelPut)) from None
            saved = await run(
                labels.put,
                layer,
                concept,
                body.label,
                note=body.note,
                author=body.author,
                expected_version=body.expected_version,
            )
        except RequestError as err:
            return error_response(err)
        return _json(saved.to_dict())

    async def delete_label(request: Request) -> Response:
        try:
            authorise(request)
            labels = await store()
            layer, concept = concept_of(request, labels)
            expected = _query_version(request)
            author = request.query_params.get("author")
            tombstone = await run(labels.delete, layer, concept, author=author, expected_version=expected)
        except RequestError as err:
            return error_response(err)
        return _json(tombstone.to_dict())

    async def export_labels(request: Request) -> Response:
        try:
            labels = await store()
            document = await run(labels.export)
        except RequestError as err:
            return error_response(err)
        return _json(document)

    async def import_labels(request: Request) -> Response:
        try:
            authorise(request)
            mode = request.query_params.get("mode", "merge")
            if mode not in ("merge", "replace"):
                raise RequestError(400, "invalid_request", f"mode {mode[:40]!r} must be 'merge' or 'replace'")
            labels = await store()
            document = await read_json_body(request, max_body_bytes)
            counts = await run(labels.import_document, document, mode=mode)
        except RequestError as err:
            return error_response(err)
        return _json({"mode": mode, **counts})

    async def concept_label(request: Request) -> Response:
        handler = {"PUT": put_label, "DELETE": delete_label}.get(request.method, get_label)
        return await handler(request)

    async def document(request: Request) -> Response:
        return await (import_labels if request.method == "PUT" else export_labels)(request)

    return [
        Route("/concepts/{layer}/{concept}/label", concept_label, methods=["GET", "PUT", "DELETE"]),
        Route("/labels", document, methods=["GET", "PUT"]),
    ]
