"""The BentoML service: HTTP in, :class:`service.engine.Engine` does the work, JSON out.

Endpoints: ``POST /explain`` (multipart upload or JSON base64), ``POST /explain_batch``,
``POST /predict`` (adaptive batching), ``GET /model``, ``GET /concepts/{layer}``,
``GET /concepts/{layer}/{id}``, the explorer page at ``GET /`` (``service/explorer.py``), plus BentoML's
``/readyz``, ``/livez``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.errors import RequestError
from service.explorer import routes as explorer_routes
from service.limits import BodySizeLimit, ConcurrencyLimit, MediaTypeGuard
from service.metrics import METRICS
from service.schemas import ExplainItem, HeatmapFormat, HeatmapKind, PredictItem
from service.settings import SETTINGS

with bentoml.importing():
    import torch

    from fact_model.artifacts import resolve_artifact_path
    from service.engine import Engine
    from service.images import decode_base64

log = logging.getLogger("fact.service")

T = TypeVar("T")


def _model_reference() -> bentoml.models.BentoModel | None:
    """The model in the BentoML store (ships with ``bentoml build``); None when FACT_ARTIFACT overrides it."""
    if SETTINGS.artifact:
        return None
    try:
        bentoml.models.get(SETTINGS.model_tag)
    except bentoml.exceptions.NotFound:
        # Not imported (``python -m service.store``): serve the shipped default artifact instead.
        return None
    return bentoml.models.BentoModel(SETTINGS.model_tag)


def _json(payload: dict[str, Any] | list[Any], endpoint: str, status: int = 200) -> Response:
    body = json.dumps(payload).encode()
    METRICS.response_bytes.labels(endpoint=endpoint).observe(len(body))
    return Response(body, status_code=status, media_type="application/json")


def _reject(err: RequestError, endpoint: str) -> Response:
    METRICS.rejected.labels(endpoint=endpoint, reason=err.reason).inc()
    return _json(err.to_json(), endpoint, err.status)


# ----------------------------------------------------------------------------- GET routes
async def _model_info(request: Request) -> Response:
    return _json(bentoml.get_current_service().engine.model_summary(), "model")


async def _concept_list(request: Request) -> Response:
    try:
        return _json(bentoml.get_current_service().engine.concept_list(request.path_params["layer"]), "concepts")
    except RequestError as err:
        return _reject(err, "concepts")


async def _concept_card(request: Request) -> Response:
    service = bentoml.get_current_service()
    try:
        card = await service._on_model_thread(
            service.engine.concept_card, request.path_params["layer"], int(request.path_params["concept"])
        )
    except RequestError as err:
        return _reject(err, "concepts")
    return _json(card, "concepts")


info_app = Starlette(
    routes=[
        Route("/model", _model_info, methods=["GET"]),
        Route("/concepts/{layer}", _concept_list, methods=["GET"]),
        Route("/concepts/{layer}/{concept:int}", _concept_card, methods=["GET"]),
        *explorer_routes(),  # the explorer page at / (service/static/) and its sample images
    ]
)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="fact",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout},
    metrics={"enabled": True, "namespace": "bentoml_service"},
)
class FaCTService:
    """Faithful concept explanations of an image classifier (FaCT)."""

    model_ref = _model_reference()

    def __init__(self) -> None:
        self._ready = False
        # Inside the service BentoML hands the reference over resolved (a stored Model with .path and .tag).
        stored = getattr(self.model_ref, "stored", self.model_ref)
        if SETTINGS.artifact:
            path, name, version = Path(SETTINGS.artifact), Path(SETTINGS.artifact).name, "local"
        elif stored is not None:
            path, name, version = Path(stored.path), stored.tag.name, stored.tag.version
        else:
            path, name, version = resolve_artifact_path("default"), "fact-default", "shipped"
            log.warning(
                "model %s is not in the BentoML store; serving the shipped default artifact", SETTINGS.model_tag
            )
        # All model work runs on one dedicated thread: PyTorch's OpenMP pool belongs to the thread
        # that calls it, and a second pool (e.g. warm-up on the main thread, requests on a worker
        # thread) spin-competes with the first for the cores — measured 2× slower per request.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fact-model")
        self.engine = self._model_thread.submit(Engine, path, SETTINGS, name, version).result()
        METRICS.model_info.labels(
            name=name,
            version=version,
            device=self.engine.device,
            weights_sha256=self.engine.model_identity["weights_sha256"],
        ).set(1)
        self._model_thread.submit(self.engine.warmup).result()
        self._update_gpu_memory()
        self._ready = True
        log.info("serving %s:%s on %s", name, version, self.engine.device)

    def __is_ready__(self) -> bool:
        return self._ready

    async def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the model thread without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, functools.partial(fn, *args))

    def _update_gpu_memory(self) -> None:
        if self.engine.device == "cuda":
            METRICS.gpu_memory.labels(device="cuda").set(torch.cuda.memory_allocated())

    def _observe(self, endpoint: str, results: list[dict[str, Any]]) -> None:
        METRICS.batch_size.labels(endpoint=endpoint).observe(len(results))
        for result in results:
            for stage, ms in result.get("timings_ms", {}).items():
                METRICS.stage_seconds.labels(endpoint=endpoint, stage=stage).observe(ms / 1e3)
            if "completeness" in result:
                METRICS.residual.observe(result["completeness"]["relative_residual"])
            for layer, count in result.get("active_concepts", {}).items():
                METRICS.active_concepts.labels(layer=layer).observe(count)
        self._update_gpu_memory()

    def _respond(self, endpoint: str, payload: dict[str, Any], results: list[dict[str, Any]]) -> Response:
        self._observe(endpoint, results)
        started = time.perf_counter()
        response = _json(payload, endpoint)
        METRICS.stage_seconds.labels(endpoint=endpoint, stage="encode").observe(time.perf_counter() - started)
        return response

    @bentoml.api(route="/explain")
    async def explain(
        self,
        image: Path = None,  # noqa: RUF013  (a Path | None union would defeat BentoML's upload handling)
        image_base64: str | None = None,
        target: int | str | None = None,
        contrast: int | str | None = None,
        top_k: int = 5,
        layers: list[str] | None = None,
        heatmaps: HeatmapFormat = "png",
        heatmap_kind: HeatmapKind = "bcos",
    ) -> dict[str, Any]:
        """Explain one image exactly: its top concepts, their contributions, heatmaps and cross-layer tree.

        Send the image as a multipart file (``image``) or as base64 in JSON (``image_base64``).
        """
        started = time.perf_counter()
        try:
            if (image is None) == (image_base64 is None):
                raise RequestError(400, "no_image", "send exactly one of: a multipart file 'image' or 'image_base64'")
            if image is not None:
                data = Path(image).read_bytes()
            else:
                data = decode_base64(image_base64, SETTINGS.max_request_bytes)
            decoded = self.engine.decode(data)
            decode_ms = 1e3 * (time.perf_counter() - started)
            results = await self._on_model_thread(
                self.engine.explain_many,
                [decoded],
                [target],
                [contrast],
                top_k,
                layers,
                heatmaps,
                heatmap_kind,
                decode_ms,
            )
            result = results[0]
        except RequestError as err:
            return _reject(err, "explain")
        return self._respond("explain", result, [result])

    @bentoml.api(route="/explain_batch")
    async def explain_batch(
        self,
        items: list[ExplainItem],
        top_k: int = 5,
        layers: list[str] | None = None,
        heatmaps: HeatmapFormat = "none",
        heatmap_kind: HeatmapKind = "bcos",
    ) -> dict[str, Any]:
        """Explain several images in one model call; each item may have its own target and contrast."""
        started = time.perf_counter()
        try:
            if not 1 <= len(items) <= SETTINGS.max_batch_items:
                raise RequestError(
                    400, "bad_batch_size", f"items must hold 1 to {SETTINGS.max_batch_items} images, got {len(items)}"
                )
            images = [
                self.engine.decode(decode_base64(item.image_base64, SETTINGS.max_request_bytes)) for item in items
            ]
            decode_ms = 1e3 * (time.perf_counter() - started)
            results = await self._on_model_thread(
                self.engine.explain_many,
                images,
                [item.target for item in items],
                [item.contrast for item in items],
                top_k,
                layers,
                heatmaps,
                heatmap_kind,
                decode_ms,
            )
        except RequestError as err:
            return _reject(err, "explain_batch")
        return self._respond("explain_batch", {"results": results}, results)

    @bentoml.api(
        route="/predict",
        batchable=True,
        max_batch_size=SETTINGS.predict_max_batch,
        max_latency_ms=SETTINGS.predict_max_latency_ms,
    )
    async def predict(self, images: list[PredictItem]) -> list[dict[str, Any]]:
        """Classes, probabilities and the top concept contributions (closed form; adaptive batching)."""
        started = time.perf_counter()
        results = await self._on_model_thread(self.engine.predict, [item.image for item in images])
        METRICS.batch_size.labels(endpoint="predict").observe(len(results))
        METRICS.stage_seconds.labels(endpoint="predict", stage="forward").observe(time.perf_counter() - started)
        return results


def _count_rejection(path: str, reason: str) -> None:
    METRICS.rejected.labels(endpoint=path.strip("/") or "root", reason=reason).inc()


# Outermost first: shed load before anything reads a body.
FaCTService.add_asgi_middleware(ConcurrencyLimit, max_in_flight=SETTINGS.max_concurrency, on_reject=_count_rejection)
FaCTService.add_asgi_middleware(
    MediaTypeGuard,
    accepted={
        "/explain": ("application/json", "multipart/form-data"),
        "/explain_batch": ("application/json",),
        "/predict": ("application/json",),
    },
    on_reject=_count_rejection,
)
FaCTService.add_asgi_middleware(BodySizeLimit, max_bytes=SETTINGS.max_request_bytes, on_reject=_count_rejection)

__all__ = ["FaCTService"]
