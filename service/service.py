"""The BentoML service: HTTP in, :class:`service.engine.Engine` does the work, JSON out.

Endpoints: ``POST /explain`` (multipart upload or JSON base64; optional ``region`` and ``where``
queries), ``POST /explain_batch``, ``POST /intervene``,
``POST /predict`` (adaptive batching), ``GET /model``, ``GET /concepts/{layer}``,
``GET /concepts/{layer}/{id}``, the explorer page at ``GET /`` (``service/explorer.py``), plus BentoML's
``/readyz``, ``/livez``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
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

from service.edge import BENTOML_REQUEST_LOGGER, Edge, QuietRefusals
from service.errors import RequestError, error_response, parse_path_id
from service.explorer import routes as explorer_routes
from service.gate import RequestGate, RouteSpec, decoded_image
from service.labels import label_routes
from service.limits import ConcurrencyLimit, ModelBacklog, QueueShedding
from service.metrics import METRICS
from service.openapi import OpenAPIDocument
from service.placement import pin_worker_gpu
from service.protocols import KSERVE_EXPLAIN, Backend, gate_routes
from service.protocols import routes as protocol_routes
from service.queries import ConceptQuery, RegionQuery
from service.schemas import ExplainBatchRequest, ExplainRequest, InterveneRequest, PredictItem, PredictRequest
from service.settings import SETTINGS

with bentoml.importing():
    import torch

    from fact_model.artifacts import resolve_artifact_path
    from fact_model.concept_labels import LabelStore
    from service.engine import Engine
    from service.gpu_metrics import GpuMonitor
    from service.images import decode_base64

# Before anything starts CUDA: with several GPUs each worker sees only its own (BentoML gives every worker
# all of them; service/placement.py says where in its source).
PINNED_GPU = pin_worker_gpu(bentoml.server_context.worker_index, SETTINGS.device, os.environ)

log = logging.getLogger("fact.service")
# BentoML's server logging shows WARNING and above for other loggers; our one line per refused
# request and the start-up line are INFO.
logging.getLogger("fact").setLevel(logging.INFO)
logging.getLogger(BENTOML_REQUEST_LOGGER).addFilter(QuietRefusals())

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


MODEL_BACKLOG = ModelBacklog()
"""This worker's queued model work (admission control of /explain*; the service reports durations)."""


def _current() -> FaCTService:
    return bentoml.get_current_service()


LOAD_WAIT_S = max(1.0, SETTINGS.request_timeout - 5.0)
"""How long a request that reaches a worker still loading its model waits for it (then 503 ``loading``)."""


def _engine_waiting() -> Engine:
    """This worker's engine, waiting up to :data:`LOAD_WAIT_S` while it loads (blocks: call off the event loop).

    With several workers, ``/readyz`` turns 200 once *a* worker is ready, while another may still
    be loading: a request that reaches that one waits for the model instead of failing.
    """
    service = _current()
    service._loaded.wait(LOAD_WAIT_S)
    engine = service.engine
    if engine is None:
        if service.load_error is not None:
            raise RequestError(503, "load_failed", "the model failed to load; the server log says why")
        raise RequestError(503, "loading", "the model is still loading; retry shortly", {"Retry-After": "5"})
    return engine


async def _engine() -> Engine:
    """This worker's engine (waiting, off the event loop, while it loads), or a 503."""
    engine = _current().engine
    if engine is not None:
        return engine
    return await asyncio.get_running_loop().run_in_executor(None, _engine_waiting)


# ----------------------------------------------------------------------------- GET routes
async def _model_info(request: Request) -> Response:
    try:
        return _json((await _engine()).model_summary(), "model")
    except RequestError as err:
        return error_response(err)


async def _concept_list(request: Request) -> Response:
    try:
        return _json((await _engine()).concept_list(request.path_params["layer"]), "concepts")
    except RequestError as err:
        return error_response(err)


async def _concept_card(request: Request) -> Response:
    service = _current()
    try:
        engine = await _engine()
        concept = parse_path_id(request.path_params["concept"], "concept", "unknown_concept")
        card = await service._on_model_thread("concepts", engine.concept_card, request.path_params["layer"], concept)
    except RequestError as err:
        return error_response(err)
    return _json(card, "concepts")


async def _label_store() -> LabelStore:
    """This worker's concept-label store (503 ``loading`` while the model loads)."""
    return (await _engine()).labels


async def _metrics(request: Request) -> Response:
    """Prometheus text of all workers (BentoML's multiprocess collector), served by us: see :mod:`service.edge`."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    client = BentoMLContainer.metrics_client.get()
    _current()._update_gpu_memory()  # this worker's GPU as of the scrape (others: as of their last response)
    content = await asyncio.get_running_loop().run_in_executor(None, client.generate_latest)
    return Response(content, media_type=client.CONTENT_TYPE_LATEST)


# KServe V1 and Open Inference Protocol V2 (service/protocols.py) over the same engine calls as our routes.
PROTOCOLS = Backend(
    loaded=lambda: _current().engine,
    alive=lambda: _current().load_error is None,
    engine=lambda: _engine(),
    run=lambda route, fn, *args, **kwargs: _current()._on_model_thread(route, fn, *args, **kwargs),
    explain=lambda texts, targets, contrasts, options: _current()._explain_items(
        "explain_batch", texts, targets, contrasts, options
    ),
    observe=lambda endpoint, results: _current()._observe(endpoint, results),
    respond=lambda payload, endpoint: _json(payload, endpoint),
)

info_app = Starlette(
    routes=[
        *protocol_routes(PROTOCOLS),
        Route("/model", _model_info, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/concepts/{layer}", _concept_list, methods=["GET"]),
        Route("/concepts/{layer}/{concept}", _concept_card, methods=["GET"]),
        *label_routes(_label_store, SETTINGS.admin_token, SETTINGS.max_request_bytes),
        *explorer_routes(),  # the explorer page at / (service/static/) and its sample images
    ]
)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(
    name="fact",
    workers=SETTINGS.workers,
    # Edge answers the deadline in the error envelope; BentoML's own 504 (another shape) comes later.
    traffic={"timeout": SETTINGS.request_timeout + 30},
    # BentoML's HTTP traffic metrics label by raw path (a junk URL is a new series): off; Edge counts by
    # route template and /metrics is served by us (fact_http_requests_total).
    metrics={"enabled": False, "namespace": "bentoml_service"},
)
class FaCTService:
    """Faithful concept explanations of an image classifier (FaCT)."""

    model_ref = _model_reference()

    def __init__(self) -> None:
        # All model work runs on one dedicated thread: PyTorch's OpenMP pool belongs to the thread
        # that calls it, and a second pool (e.g. warm-up on the main thread, requests on a worker
        # thread) spin-competes with the first for the cores — measured 2× slower per request.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fact-model")
        self.engine: Engine | None = None
        self.gpu: GpuMonitor | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        # Loading runs in the background so the server accepts connections at once: /readyz answers
        # 503 (and the APIs 503 "loading") until the model is loaded and warmed up.
        self._model_thread.submit(self._load)

    def _load(self) -> None:
        try:
            path, name, version = self._artifact()
            engine = Engine(path, SETTINGS, name, version)
            METRICS.model_info.labels(
                name=name, version=version, device=engine.device, weights_sha256=engine.model_identity["weights_sha256"]
            ).set(1)
            if engine.compute.uses_cuda:
                self.gpu = GpuMonitor.for_current_device(f"cuda:{PINNED_GPU or torch.cuda.current_device()}")
            for route, (seconds, units) in engine.warmup().items():
                MODEL_BACKLOG.observe(route, seconds, units)
            self.engine = engine
            self._update_gpu_memory()
            pinned = f" (CUDA_VISIBLE_DEVICES={PINNED_GPU})" if PINNED_GPU else ""
            log.info("serving %s:%s on %s%s in %s", name, version, engine.device, pinned, engine.compute.dtype)
        except BaseException as err:  # reported by /readyz staying 503 and in the log
            self.load_error = err
            log.exception("loading the model failed")
        finally:
            self._loaded.set()

    def _artifact(self) -> tuple[Path, str, str]:
        # Inside the service BentoML hands the reference over resolved (a stored Model with .path and .tag).
        stored = getattr(self.model_ref, "stored", self.model_ref)
        if SETTINGS.artifact:
            return Path(SETTINGS.artifact), Path(SETTINGS.artifact).name, "local"
        if stored is not None:
            return Path(stored.path), stored.tag.name, stored.tag.version
        log.warning("model %s is not in the BentoML store; serving the shipped default artifact", SETTINGS.model_tag)
        return resolve_artifact_path("default"), "fact-default", "shipped"

    def __is_ready__(self) -> bool:
        return self.engine is not None

    def __is_alive__(self) -> bool:
        """False once loading failed: /livez answers 503 and an orchestrator restarts the worker."""
        return self.load_error is None

    async def _on_model_thread(self, route: str, fn: Callable[..., T], *args: Any, units: int = 1) -> T:
        """Run ``fn(*args)`` on the model thread without blocking the event loop; its duration feeds admission."""

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                MODEL_BACKLOG.observe(route, time.perf_counter() - started, units)

        return await asyncio.get_running_loop().run_in_executor(self._model_thread, timed)

    def _update_gpu_memory(self) -> None:
        if self.gpu is not None:
            self.gpu.publish(METRICS)

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

    @staticmethod
    def _image(text: str) -> Any:
        """The image the request gate decoded (off the event loop) for this base64 text."""
        image = decoded_image(text)
        if image is None:  # every API route is gated: a missing image is a wiring bug, not a client error
            raise RuntimeError("the request gate did not decode this request's image")
        return image

    async def _explain_items(
        self,
        route: str,
        texts: list[str],
        targets: list[Any],
        contrasts: list[Any],
        request: dict[str, Any],
        region: RegionQuery | None = None,
        where: ConceptQuery | None = None,
    ) -> list[dict[str, Any]]:
        """Explanations of the decoded images ``texts`` in one model call (``request``'s shared options)."""
        started = time.perf_counter()
        engine = await _engine()
        images = [self._image(text) for text in texts]
        decode_ms = 1e3 * (time.perf_counter() - started)
        return await self._on_model_thread(
            route,
            functools.partial(engine.explain_many, region=region, where=where),
            images,
            targets,
            contrasts,
            request["top_k"],
            request["layers"],
            request["heatmaps"],
            request["heatmap_kind"],
            decode_ms,
            request["heatmap_size"],
            units=explain_units(len(images), request["top_k"]),
        )

    def _queries(self, request: dict[str, Any]) -> tuple[RegionQuery | None, ConceptQuery | None]:
        """The ``region`` and ``where`` of an ``/explain`` request (the gate decoded a region's mask image)."""
        region = where = None
        if request.get("region") is not None:
            given = request["region"]
            box = None if given.box is None else (given.box.x0, given.box.y0, given.box.x1, given.box.y1)
            mask = None if given.mask_base64 is None else self._image(given.mask_base64)
            region = RegionQuery(given.layer, box, mask)
        if request.get("where") is not None:
            where = ConceptQuery(request["where"].layer, request["where"].id)
        return region, where

    @bentoml.api(route="/explain", input_spec=ExplainRequest)
    async def explain(self, **request: Any) -> dict[str, Any]:
        """Explain one image exactly: its top concepts, their contributions, heatmaps and cross-layer tree.

        Send JSON with ``image_base64``, or a multipart form with the file ``image`` and the same other fields.
        """
        try:
            region, where = self._queries(request)
            results = await self._explain_items(
                "explain", [request["image_base64"]], [request["target"]], [request["contrast"]], request, region, where
            )
        except RequestError as err:
            return error_response(err)
        return self._respond("explain", results[0], results)

    @bentoml.api(route="/intervene", input_spec=InterveneRequest)
    async def intervene(self, **request: Any) -> dict[str, Any]:
        """Remove or scale concepts and re-run the network from the edited reconstruction.

        Returns the new prediction and a fresh exact explanation, the edits with their contributions
        before, and the linear prediction of the change (the edited concepts' contributions) next to the
        measured change: the gap is what the B-cos layers' dynamic scales add.
        """
        started = time.perf_counter()
        try:
            engine = await _engine()
            image = self._image(request["image_base64"])
            edit = functools.partial(
                engine.intervene,
                image,
                layer=request["layer"],
                remove=request["remove"],
                scale={item.concept: item.factor for item in request["scale"]},
                remove_top=request["remove_top"],
                keep_top=request["keep_top"],
                target=request["target"],
                contrast=request["contrast"],
                top_k=request["top_k"],
                layers=request["layers"],
                heatmaps=request["heatmaps"],
                heatmap_kind=request["heatmap_kind"],
                heatmap_size=request["heatmap_size"],
                decode_ms=1e3 * (time.perf_counter() - started),
            )
            if len(request["scale"]) != len({item.concept for item in request["scale"]}):
                raise RequestError(400, "bad_intervention", "scale lists a concept more than once")
            result = await self._on_model_thread("intervene", edit, units=intervene_units(request["top_k"]))
        except RequestError as err:
            return error_response(err)
        return self._respond("intervene", result, [result["after"]])

    @bentoml.api(route="/explain_batch", input_spec=ExplainBatchRequest)
    async def explain_batch(self, **request: Any) -> dict[str, Any]:
        """Explain several images in one model call; each item may have its own target and contrast."""
        items = request["items"]
        try:
            results = await self._explain_items(
                "explain_batch",
                [item.image_base64 for item in items],
                [item.target for item in items],
                [item.contrast for item in items],
                request,
            )
        except RequestError as err:
            return error_response(err)
        return self._respond("explain_batch", {"results": results}, results)

    @bentoml.api(
        route="/predict",
        batchable=True,
        max_batch_size=SETTINGS.predict_max_batch,
        max_latency_ms=SETTINGS.predict_max_latency_ms,
    )
    async def predict(self, images: list[PredictItem]) -> list[dict[str, Any]]:
        """Classes, probabilities and the top concept contributions (closed form; adaptive batching).

        At most ``FACT_PREDICT_MAX_BATCH`` images per request (400 above it); BentoML merges requests.
        """
        started = time.perf_counter()
        engine = await _engine()
        results = await self._on_model_thread("predict", engine.predict, [item.image for item in images])
        METRICS.batch_size.labels(endpoint="predict").observe(len(results))
        METRICS.stage_seconds.labels(endpoint="predict", stage="forward").observe(time.perf_counter() - started)
        return results


def _decode_upload(data: bytes) -> Any:
    return _engine_waiting().decode(data)  # on the gate's decode thread


def _count_request(route: str, method: str, status: int, seconds: float) -> None:
    METRICS.http_requests.labels(route=route, method=method, status=str(status)).inc()
    METRICS.http_seconds.labels(route=route).observe(seconds)


def _count_rejection(route: str, reason: str) -> None:
    METRICS.rejected.labels(endpoint=route, reason=reason).inc()


def explain_units(images: int, top_k: int) -> int:
    """Work units of an explanation (admission control): each top concept costs a backward pass and a heatmap."""
    return images * (1 + top_k)


def intervene_units(top_k: int) -> int:
    """Work units of an intervention: two explanations of one image (before and after the edit)."""
    return 2 * explain_units(1, top_k)


def _explain_images(payload: dict[str, Any]) -> list[str]:
    """The images of an ``/explain`` body: the image, and a region's mask when it has one."""
    mask = (payload.get("region") or {}).get("mask_base64")
    return [payload["image_base64"], *([mask] if isinstance(mask, str) else [])]


def _predict_images(payload: dict[str, Any]) -> list[str]:
    return [item["image_base64"] for item in payload["images"]]


# Outermost first. Edge: ids, one error shape, deadline, bounded metrics; then too many requests in
# flight are refused before any body is read; the gate reads, checks and decodes the body; only a
# valid request is admitted to the model queue, or refused at once when it could not start in time.
FaCTService.add_asgi_middleware(
    Edge, timeout_s=SETTINGS.request_timeout, on_request=_count_request, on_reject=_count_rejection
)
if SETTINGS.cors_origins:
    from starlette.middleware.cors import CORSMiddleware

    FaCTService.add_asgi_middleware(
        CORSMiddleware,
        allow_origins=list(SETTINGS.cors_origins),
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=["Content-Type", "X-Request-ID", "traceparent", "Authorization"],
        expose_headers=["X-Request-ID", "Retry-After"],
    )
FaCTService.add_asgi_middleware(OpenAPIDocument, service=FaCTService, settings=SETTINGS)
FaCTService.add_asgi_middleware(ConcurrencyLimit, max_in_flight=SETTINGS.max_concurrency)
FaCTService.add_asgi_middleware(
    RequestGate,
    routes={
        "/explain": RouteSpec(
            ExplainRequest,
            ("application/json",),
            _explain_images,
            multipart=True,
            work_units=lambda p: explain_units(1, p.get("top_k", 5)),
        ),
        "/intervene": RouteSpec(
            InterveneRequest,
            ("application/json",),
            lambda p: [p["image_base64"]],
            work_units=lambda p: intervene_units(p.get("top_k", 5)),
        ),
        "/explain_batch": RouteSpec(
            ExplainBatchRequest,
            ("application/json",),
            lambda p: [i["image_base64"] for i in p["items"]],
            work_units=lambda p: explain_units(len(p["items"]), p.get("top_k", 5)),
        ),
        "/predict": RouteSpec(PredictRequest, ("application/json",), _predict_images),
        **gate_routes(),
    },
    max_bytes=SETTINGS.max_request_bytes,
    body_timeout_s=SETTINGS.body_timeout_s,
    decode=_decode_upload,
    unbase64=lambda text: decode_base64(text, SETTINGS.max_request_bytes),
    decode_concurrency=SETTINGS.decode_concurrency,
)

FaCTService.add_asgi_middleware(
    QueueShedding,
    backlog=MODEL_BACKLOG,
    routes={
        "/explain": "explain",
        "/explain_batch": "explain_batch",
        "/intervene": "intervene",
        KSERVE_EXPLAIN: "explain_batch",
    },
    budget_s=SETTINGS.queue_budget_s,
)

__all__ = ["FaCTService"]
