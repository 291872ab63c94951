"""ASGI middleware that sheds load at once, with ``Retry-After``: too many requests in flight (429, before
a body is read), or more model work queued than can start in time (503, for a valid request, before any
model work).

Without them a storm queues: BentoML's batching refuses with 503 only after the request was
read and validated (6–20 s late under a 4× storm, docs/LOAD.md), and explanations, which do
not batch, waited for their 30 s deadline and a 504.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

from service.errors import RequestError, send_error

__all__ = ["WORK_UNITS", "ConcurrencyLimit", "ModelBacklog", "PathTable", "QueueShedding"]

WORK_UNITS = "fact.work_units"
"""ASGI scope key: the request's work units, set by the request gate (absent: 1)."""

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


T = TypeVar("T")


class PathTable(Generic[T]):
    """Path → value, by exact path or by compiled pattern (``fullmatch``); an exact path wins.

    The request gate (route specs) and :class:`QueueShedding` (cost routes) look paths up the same way.
    """

    def __init__(self, entries: Mapping[str | re.Pattern[str], T]) -> None:
        self.exact = {path: value for path, value in entries.items() if isinstance(path, str)}
        self.patterns = [(path, value) for path, value in entries.items() if not isinstance(path, str)]

    def get(self, path: str) -> T | None:
        """The value of ``path``, or None."""
        if path in self.exact:
            return self.exact[path]
        return next((value for pattern, value in self.patterns if pattern.fullmatch(path)), None)


PROBES = frozenset({"/metrics", "/healthz", "/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})
"""Probe and metrics paths: never shed or size-checked."""


class ConcurrencyLimit:
    """Answer 429 at once when ``max_in_flight`` requests are already being served (per worker process).

    Probes and ``/metrics`` are never shed. Refusals are counted by :class:`service.edge.Edge`
    (``fact_rejected_requests_total{reason="busy"}``), like every other error response.

    Args:
        app: the wrapped ASGI app.
        max_in_flight: concurrent requests admitted; 0 disables the limit.
    """

    SKIP = PROBES

    def __init__(self, app: Any, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.SKIP:
            await self.app(scope, receive, send)
            return
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            message = f"server busy: {self.in_flight} requests in flight (limit {self.max_in_flight}); retry later"
            await send_error(send, RequestError(429, "busy", message, {"Retry-After": "1"}))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class ModelBacklog:
    """Seconds of model-thread work admitted and not yet finished, in one worker.

    A request's cost is its number of *work units* (for an explanation: images × (1 + top_k),
    as each top concept costs a backward pass and a heatmap) times its route's seconds per
    unit, an exponential moving average of measured model-thread time (:meth:`observe`). Each
    admitted request adds its cost until it finishes; the backlog is the wait a new request
    would face. Thread-safe (the model thread reports, the event loop admits).

    Args:
        initial_s: seconds per unit assumed for a route before any measurement.
        smoothing: weight of a new measurement in the moving average.
    """

    def __init__(self, initial_s: float = 0.05, smoothing: float = 0.2) -> None:
        self.initial_s = initial_s
        self.smoothing = smoothing
        self._cost: dict[str, float] = {}
        self._backlog = 0.0
        self._lock = threading.Lock()

    def cost(self, route: str, units: int = 1) -> float:
        """Expected model seconds of a request of ``units`` work units to ``route``."""
        return units * self._cost.get(route, self.initial_s)

    @property
    def backlog_s(self) -> float:
        return self._backlog

    def observe(self, route: str, seconds: float, units: int = 1) -> None:
        """Record one measured model-thread duration of a request of ``units`` work units to ``route``."""
        per_unit = seconds / max(1, units)
        with self._lock:
            old = self._cost.get(route)
            self._cost[route] = per_unit if old is None else (1 - self.smoothing) * old + self.smoothing * per_unit

    def admit(self, route: str, units: int = 1) -> float:
        """Add one request's expected cost; returns it (give it back to :meth:`finish`)."""
        with self._lock:
            cost = units * self._cost.get(route, self.initial_s)
            self._backlog += cost
            return cost

    def finish(self, cost: float) -> None:
        with self._lock:
            self._backlog = max(0.0, self._backlog - cost)


class QueueShedding:
    """Answer 503 with ``Retry-After`` at once when a request to a model route could not start within ``budget_s``.

    The predicted wait is the worker's :class:`ModelBacklog`; a request is admitted while
    ``backlog + its own cost ≤ budget_s``, so every admitted request is served well within
    its deadline and every refused one is told so in milliseconds (it sits after the request
    gate: a request that fails validation or decoding never counts as model work).

    Args:
        app: the wrapped ASGI app.
        backlog: the worker's model backlog (shared with the service, which reports durations).
        routes: path (or compiled path pattern) → route name used for costs (e.g. ``{"/explain":
            "explain"}``); the request's work units come from the scope (:data:`WORK_UNITS`, set by
            the request gate).
        budget_s: the longest predicted queue wait admitted.
    """

    def __init__(
        self, app: Any, backlog: ModelBacklog, routes: dict[str | re.Pattern[str], str], budget_s: float
    ) -> None:
        self.app = app
        self.backlog = backlog
        self.routes = PathTable(routes)
        self.budget_s = budget_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        units = int(scope.get(WORK_UNITS, 1))
        wait = self.backlog.backlog_s
        if wait > 0 and wait + self.backlog.cost(route, units) > self.budget_s:
            retry = max(1, math.ceil(wait))
            message = (
                f"server overloaded: about {wait:.1f} s of model work is queued in this worker "
                f"(limit {self.budget_s:g} s); retry in {retry} s"
            )
            await send_error(send, RequestError(503, "overloaded", message, {"Retry-After": str(retry)}))
            return
        cost = self.backlog.admit(route, units)
        try:
            await self.app(scope, receive, send)
        finally:
            self.backlog.finish(cost)
