"""The whole GPU endpoint in one run: ``python -m benchmarks.gpu_endpoint [--smoke] [--out DIR] [--budget S]``.

One prepared script for a lent GPU machine (at most ~8 minutes): it installs nothing and needs only the
repository on ``PYTHONPATH`` (and, on the lent machine, the wheels of ``deploy/gpu_wheels.txt``).

1. **Kernels**: ``python -m benchmarks.gpu_kernels`` in a subprocess (about 45 % of ``--budget``,
   ``--out OUT/kernels``): correctness rows, end-to-end explain with kernels on vs off, B-cos layers vs
   the bare cuDNN convolution, concept encode vs ``matmul`` + ``topk`` at K = 16384.
2. **Models**: the shipped default model and a random-weight FaCT B-cos-v2 ResNet-50
   (:func:`benchmarks.scale_artifact.build_scale_artifact`: ``layer4``, K = 16384, k = 16, 224 px,
   1,000 classes), each served by a real ``bentoml serve`` on loopback
   (:func:`tests._support.server.running_server`, ``FACT_DEVICE=cuda``, ``FACT_DTYPE=--dtype``).
3. Per model, on scikit-image's photographs sent as base64 JPEG: ``/predict`` (one image) p50/p95 at
   one client; ``/explain`` (top 5, PNG heatmaps) at 1 and 16 clients; ``/explain_batch`` of 32 items
   at 1 and 16 clients (explained images/s). **Every response is checked**: HTTP 200, each record's
   ``completeness.relative_residual`` within the bound of the dtype, each listed concept's heatmap a
   PNG of the expected size. Then ``/metrics`` (mean stage seconds per endpoint, the GPU gauges) and
   ``GET /model`` (device, dtype).
4. **Goals** (met / missed / not measured, with the figure) and a correctness table.

Writes ``gpu_endpoint.json`` (everything, the kernel benchmark's report included) and
``gpu_endpoint.md`` (the tables, ready for ``docs/BENCHMARKS.md``) under ``--out`` (default ``$OUT``, else
``runs/gpu_endpoint``), beside ``kernels/kernels_bench.json`` and the logs (each cut to its last 200 kB):
at most 8 files, 2 folders deep, as the device tool brings back. The tables are the last lines printed.
Exit code 0 when every correctness check passed (kernel rows, responses, metrics), even with speed goals
missed; 1 otherwise. Both files are rewritten after every section, so a run stopped from outside leaves
what it measured.

``--smoke`` runs it all on the CPU at tiny sizes (the kernel benchmark's own ``--smoke`` in Triton's
interpreter, overlapping the model sections to keep CI short; a tiny
``bcos_resnet8`` stands in for ResNet-50): ``tests/benchmarks/test_gpu_endpoint.py``. Its figures
mean nothing; the goals are evaluated the same way and say so.

On the lent H200 (``deploy/fetch_gpu_wheels.sh`` first, here; the call carries ``[".whl"]``, ``timeout_s``
560: typically ~400 s; the worst case, every server start taking its full 240 s, runs past it)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
        python3 -m benchmarks.gpu_endpoint --budget 420 --dtype tf32
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.gpu_kernels import Budget, Sections

__all__ = [
    "GOALS",
    "RESIDUAL_BOUNDS",
    "ResponseCheck",
    "check_response",
    "evaluate_goals",
    "main",
    "parse_metrics",
]

log = logging.getLogger("benchmarks.gpu_endpoint")

REPO = Path(__file__).resolve().parents[1]

RESIDUAL_BOUNDS = {"float32": 1e-4, "tf32": 1e-2, "bfloat16": 5e-2}
"""Largest ``completeness.relative_residual`` a response may report, per ``FACT_DTYPE``."""

GOALS = {
    "explain_speedup": 1.5,  # end-to-end explain, kernels on ÷ kernels off (gpu_kernels end_to_end)
    "layer_vs_cudnn": 1.25,  # B-cos layer (dispatched path) ÷ bare cuDNN convolution, every ResNet-50 shape
    "encode_speedup": 1.5,  # concept encode ÷ matmul + topk at K = 16384 (as gpu_concept_kernels.GOALS)
    "explained_images_per_s": 300.0,  # ResNet-50 FaCT, top-5 maps, /explain_batch of 32
    "explain_vs_predict": 4.0,  # single-image /explain p50 ÷ /predict p50, per model
}
GOAL_NAMES = {
    "explain_speedup": "explain, kernels on vs off",
    "layer_vs_cudnn": "B-cos layer vs bare cuDNN conv",
    "encode_speedup": "concept encode vs matmul+topk",
    "explained_images_per_s": "ResNet-50 explained images/s",
    "explain_vs_predict": "/explain p50 vs /predict p50",
}
ENCODE_GOAL_K = 16384
STATUSES = ("met", "missed", "not measured")

GPU_GAUGES = (
    "fact_gpu_memory_bytes",
    "fact_gpu_memory_reserved_bytes",
    "fact_gpu_memory_peak_bytes",
    "fact_gpu_utilisation_ratio",
    "fact_gpu_device_memory_used_bytes",
    "fact_gpu_device_memory_total_bytes",
)
LOG_TAIL_BYTES = 200_000
CHECK_CHUNKS = 16
"""Parts a row's responses are checked in (one process-pool task each)."""
PROFILE_ROWS = 12
"""Kernels of the explain profile shown per mode (the JSON keeps the benchmark's 25)."""
KERNEL_SHARE = 0.45
"""Part of ``--budget`` the kernel benchmark gets (its own ``--budget``)."""


@dataclass(frozen=True)
class Sizes:
    """Request counts and model shapes of one mode (GPU or smoke)."""

    batch_items: int  # images per /explain_batch request
    requests: Mapping[str, int]  # measured requests per row kind (a row also stops at its deadline)
    warmup: int  # unmeasured requests before each row
    clients: int  # concurrent clients of the loaded rows
    startup_timeout_s: float  # a server's start, warm-up (kernel tuning) included
    min_rows_s: float  # seconds the rows of a model get at least, whatever the budget says
    kernels_args: tuple[str, ...]  # extra arguments of python -m benchmarks.gpu_kernels
    scale_model: Mapping[str, Any]  # build_scale_artifact arguments of the ResNet-50 (or its stand-in)


GPU_SIZES = Sizes(
    batch_items=32,
    requests={"predict": 60, "explain": 40, "explain_loaded": 64, "batch": 20, "batch_loaded": 48},
    warmup=3,
    clients=16,
    startup_timeout_s=240,
    min_rows_s=30,
    kernels_args=(),  # every section, float32 (TF32) and bfloat16
    scale_model={},  # the defaults: bcos_v2_resnet50, layer4 K=16384 k=16, 224 px, 1000 classes
)
SMOKE_SIZES = Sizes(
    batch_items=4,
    requests={"predict": 4, "explain": 4, "explain_loaded": 16, "batch": 3, "batch_loaded": 16},
    warmup=1,
    clients=16,
    startup_timeout_s=120,
    min_rows_s=5,
    kernels_args=(),  # every section, as `gpu_kernels --smoke` alone: CI checks both reports of one run
    scale_model={
        "backbone": "bcos_resnet8",
        "backbone_kwargs": {"width": 4},
        "layers": (("layer3", 32, 4),),
        "input_size": 32,
        "num_classes": 10,
    },
)


# ----------------------------------------------------------------------------- response checks


@dataclass
class ResponseCheck:
    """What the checks of some responses found: explanations checked, the worst residual, the problems."""

    responses: int = 0
    explanations: int = 0
    heatmaps: int = 0
    worst_residual: float = 0.0
    problems: list[str] = field(default_factory=list)

    def add(self, other: ResponseCheck) -> None:
        self.responses += other.responses
        self.explanations += other.explanations
        self.heatmaps += other.heatmaps
        self.worst_residual = max(self.worst_residual, other.worst_residual)
        self.problems += other.problems

    @property
    def failed(self) -> int:
        """Responses with at least one problem."""
        return len({p.split(":", 1)[0] for p in self.problems})


def check_response(
    route: str, status: int, body: bytes, residual_bound: float, heatmap_side: int, items: int, tag: str = ""
) -> ResponseCheck:
    """Check one response of ``route``: HTTP 200, complete explanations, decodable heatmaps of the right size.

    Args:
        route: ``/predict``, ``/explain`` or ``/explain_batch``.
        status, body: the HTTP status and the raw response body.
        residual_bound: largest ``completeness.relative_residual`` allowed (dimensionless).
        heatmap_side: the side, in pixels, every PNG heatmap must have.
        items: images in the request (records expected in the response).
        tag: names the response in the problems (each problem starts with ``tag:``).

    Returns:
        One response's :class:`ResponseCheck` (``problems`` empty when it passed).
    """
    from PIL import Image

    check = ResponseCheck(responses=1)
    tag = tag or route

    def problem(text: str) -> None:
        check.problems.append(f"{tag}: {text}")

    if status != 200:
        problem(f"HTTP {status}: {body[:200]!r}")
        return check
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem(f"not JSON ({err})")
        return check
    if route == "/predict":
        records = parsed if isinstance(parsed, list) else []
        if len(records) != items or not all(isinstance(r, dict) and "prediction" in r for r in records):
            problem(f"expected {items} prediction records, got {str(parsed)[:200]}")
        return check
    records = [parsed] if route == "/explain" else parsed.get("results", []) if isinstance(parsed, dict) else []
    if len(records) != items:
        problem(f"expected {items} explanation records, got {len(records)}")
    for n, record in enumerate(records):
        try:
            residual = float(record["completeness"]["relative_residual"])
        except (KeyError, TypeError, ValueError):
            problem(f"record {n} has no completeness.relative_residual")
            continue
        check.explanations += 1
        if not residual <= residual_bound:  # NaN fails too
            problem(f"record {n}: relative residual {residual:.2e} > {residual_bound:g}")
        if residual == residual:
            check.worst_residual = max(check.worst_residual, residual)
        for concept in record.get("concepts", []):
            heatmap = concept.get("heatmap")
            if not isinstance(heatmap, dict) or "png_base64" not in heatmap:
                problem(f"record {n}: concept {concept.get('id')} has no PNG heatmap")
                continue
            try:
                image = Image.open(io.BytesIO(base64.b64decode(heatmap["png_base64"], validate=True)))
                image.load()
            except Exception as err:  # any decoding failure is the response's fault
                problem(f"record {n}: concept {concept.get('id')}: heatmap does not decode ({err})")
                continue
            check.heatmaps += 1
            if image.format != "PNG" or image.size != (heatmap_side, heatmap_side):
                problem(f"record {n}: heatmap {image.format} {image.size}, expected PNG {heatmap_side}²")
    return check


def _check_some(args: tuple[str, list[tuple[int, int, bytes]], float, int, int, str]) -> ResponseCheck:
    """:func:`check_response` over ``(index, status, body)`` responses of one row (a process-pool task)."""
    route, responses, bound, side, items, row = args
    total = ResponseCheck()
    for i, status, body in responses:
        total.add(check_response(route, status, body, bound, side, items, tag=f"{row} #{i}"))
    return total


def check_responses(
    route: str,
    responses: list[tuple[int, bytes]],
    residual_bound: float,
    heatmap_side: int,
    items: int,
    row: str,
    pool: Executor | None = None,
) -> ResponseCheck:
    """:func:`check_response` of every ``(status, body)`` of a row, spread over ``pool``'s processes if given.

    A response of 32 explanations with top-5 PNG maps is ~15 MB of JSON and 160 PNGs to decode:
    about a quarter of a second of one core.
    """
    indexed = [(i, status, body) for i, (status, body) in enumerate(responses)]
    chunks = [indexed[w::CHECK_CHUNKS] for w in range(CHECK_CHUNKS) if indexed[w::CHECK_CHUNKS]]
    tasks = [(route, chunk, residual_bound, heatmap_side, items, row) for chunk in chunks]
    total = ResponseCheck()
    for part in pool.map(_check_some, tasks) if pool is not None else map(_check_some, tasks):
        total.add(part)
    return total


# ----------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, Any]:
    """The figures of a ``/metrics`` page (Prometheus text format) that the report keeps.

    Returns:
        ``stage_ms``: ``{endpoint: {stage: mean milliseconds}}`` of ``fact_explain_stage_seconds``
        (sum / count); ``stage_count``: the observations behind each mean; ``gpu``: each of
        :data:`GPU_GAUGES` → the largest value over its samples (bytes, or a ratio in [0, 1]), None
        when the page has no such gauge.
    """
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    gauges: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "fact_explain_stage_seconds":
                key = (sample.labels.get("endpoint", ""), sample.labels.get("stage", ""))
                if sample.name.endswith("_sum"):
                    sums[key] = sample.value
                elif sample.name.endswith("_count"):
                    counts[key] = sample.value
            elif sample.name in GPU_GAUGES:
                gauges.setdefault(sample.name, []).append(sample.value)
    stage_ms: dict[str, dict[str, float]] = {}
    stage_count: dict[str, dict[str, int]] = {}
    for (endpoint, stage), count in sorted(counts.items()):
        if count > 0 and (endpoint, stage) in sums:
            stage_ms.setdefault(endpoint, {})[stage] = 1e3 * sums[endpoint, stage] / count
            stage_count.setdefault(endpoint, {})[stage] = int(count)
    gpu = {name: max(gauges[name]) if gauges.get(name) else None for name in GPU_GAUGES}
    return {"stage_ms": stage_ms, "stage_count": stage_count, "gpu": gpu}


# ----------------------------------------------------------------------------- kernels


def _python_path() -> str:
    """The repository, then this process's own ``PYTHONPATH`` (a subprocess's import path)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def _tail(path: Path, limit: int = LOG_TAIL_BYTES) -> None:
    """Cut the file at ``path`` to its last ``limit`` bytes (the device tool brings back small files)."""
    if path.exists() and path.stat().st_size > limit:
        data = path.read_bytes()[-limit:]
        path.write_bytes(b"[... cut to the last %d bytes ...]\n" % limit + data)


class KernelBenchmark:
    """``python -m benchmarks.gpu_kernels`` in a subprocess, and the summary of its report."""

    def __init__(self, out: Path, budget_s: float, smoke: bool, extra: tuple[str, ...] = ()) -> None:
        self.out, self.budget_s, self.smoke = out, budget_s, smoke
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "kernels.log"
        self.command = [sys.executable, "-m", "benchmarks.gpu_kernels", "--out", str(out),
                        "--budget", f"{budget_s:.0f}", *extra]  # fmt: skip
        if smoke:
            self.command.append("--smoke")
        env = {**os.environ, "PYTHONPATH": _python_path()}
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        log.info("kernels: %s", shlex.join(self.command[1:]))

    def result(self, timeout_s: float) -> dict[str, Any]:
        """Wait (at most ``timeout_s``) and summarise ``kernels_bench.json``; raises when there is none."""
        try:
            returncode = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            _tail(self.log_path)
            raise RuntimeError(
                f"gpu_kernels ran past {timeout_s:.0f} s and was stopped (log: {self.log_path})"
            ) from None
        _tail(self.log_path)
        seconds = time.monotonic() - self.started
        path = self.out / "kernels_bench.json"
        if not path.exists():
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gpu_kernels exited {returncode} without a report; its log ends:\n{tail}")
        report = json.loads(path.read_text())
        return {"returncode": returncode, "seconds": seconds, **summarise_kernels(report), "report": report}


def summarise_kernels(report: Mapping[str, Any]) -> dict[str, Any]:
    """What the goals and the correctness table read from a ``kernels_bench.json`` report.

    ``correctness``: rows, rows ok, worst ``rel_err`` and the failed rows; ``end_to_end``: images/s and
    speed-ups (kernels on ÷ off; ``explain_batched_triton_speedup`` against the looped kernels-off
    explain); ``layers``: per shape and dtype, dispatched-path ms, bare cuDNN ms and their ratio;
    ``encode``: the K = 16384 encode rows (ours ÷ matmul+topk as ``speedup``).
    """
    rows = report.get("correctness") or []
    errors = [float(r["rel_err"]) for r in rows if r.get("rel_err") == r.get("rel_err") and "rel_err" in r]
    correctness = {
        "rows": len(rows),
        "ok": sum(1 for r in rows if r.get("ok")),
        "worst_rel_err": max(errors, default=None),
        "failed": [r for r in rows if not r.get("ok")][:20],
    }
    e2e = report.get("end_to_end") or None
    keep = ("arch", "batch", "size", "K", "k", "top", "explain_speedup", "explain_batched_triton_speedup",
            "explain_torch_images_per_s", "explain_triton_images_per_s", "explain_batched_triton_images_per_s",
            "forward_speedup", "max_relative_residual_on", "explain_profile")  # fmt: skip
    layer_keys = ("net", "layer", "dtype", "dispatch_path", "ours_dispatch_ms", "cudnn_floor_ms", "vs_floor", "skipped")
    layers = [{k: r.get(k) for k in layer_keys} for r in report.get("layers") or []]
    encode = [
        {k: r.get(k) for k in ("dtype", "shape", "path", "ours", "ours_ms", "baseline_ms", "speedup", "dispatch_pick")}
        for r in report.get("concept_timings") or []
        if r.get("kernel") == "encode"
    ]
    return {
        "correctness": correctness,
        "end_to_end": None if e2e is None else {k: e2e.get(k) for k in keep if k in e2e},
        "layers": layers,
        "encode": encode,
        "notes": list(report.get("notes", [])),
        "device_name": report.get("device_name"),
    }


# ----------------------------------------------------------------------------- load


def _post(url: str, body: bytes, timeout: float) -> tuple[int, bytes, float]:
    """``(status, body, seconds)`` of one POST; HTTP errors are returned, connection errors as status 0."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, data = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, data = err.code, err.read()
    except OSError as err:
        status, data = 0, repr(err).encode()
    return status, data, time.perf_counter() - started


@dataclass(frozen=True)
class Row:
    """One measured load: a route, its request bodies, concurrent clients, requests and images per request."""

    name: str
    route: str
    clients: int
    requests: int
    items: int
    bodies: tuple[bytes, ...]  # request i sends bodies[i % len(bodies)]


def _bodies(route: str, images: list[str], items: int) -> tuple[bytes, ...]:
    """The distinct request bodies of a route (one per starting photograph), JSON bytes."""
    out = []
    for i in range(len(images)):
        if route == "/predict":
            payload: dict[str, Any] = {"images": [{"image_base64": images[i]}]}
        elif route == "/explain":
            payload = {"image_base64": images[i], "top_k": 5, "heatmaps": "png"}
        else:
            batch = [{"image_base64": images[(i + j) % len(images)]} for j in range(items)]
            payload = {"items": batch, "top_k": 5, "heatmaps": "png"}
        out.append(json.dumps(payload).encode())
    return tuple(out)


def run_row(url: str, row: Row, warmup: int, deadline: float, timeout: float) -> tuple[dict[str, Any], list]:
    """Send ``row``'s requests from ``row.clients`` threads; stop early at ``deadline`` (``time.monotonic``).

    Every client sends at least one request. Only the HTTP exchange is timed: the responses are
    returned, to be checked after the row (checking them here would take the clients' CPU).

    Returns:
        ``(stats, responses)``: ``stats`` has ``requests``, ``p50_ms``, ``p95_ms``, ``requests_per_s``
        and ``images_per_s`` (images of the 200 responses ÷ wall seconds); ``responses`` the
        ``(status, body)`` of each measured request.
    """
    for i in range(warmup):
        _post(url + row.route, row.bodies[i % len(row.bodies)], timeout)
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    responses: list[tuple[int, bytes]] = []

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= row.requests or (issued >= row.clients and time.monotonic() > deadline):
                    return
                i = issued
                issued += 1
            status, data, seconds = _post(url + row.route, row.bodies[i % len(row.bodies)], timeout)
            with lock:
                latencies.append(seconds)
                responses.append((status, data))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=row.clients) as pool:
        for future in [pool.submit(client) for _ in range(row.clients)]:
            future.result()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    served = sum(row.items for status, _ in responses if status == 200)
    stats = {
        "name": row.name,
        "route": row.route,
        "clients": row.clients,
        "items": row.items,
        "requests": len(ordered),
        "p50_ms": 1e3 * statistics.median(ordered),
        "p95_ms": 1e3 * ordered[round(0.95 * (len(ordered) - 1))],
        "requests_per_s": len(ordered) / wall,
        "images_per_s": served / wall,
        "wall_s": wall,
    }
    return stats, responses


def _model_summary(model: Mapping[str, Any]) -> dict[str, Any]:
    """What the report keeps of ``GET /model``: device, any dtype/precision field, shape of the model."""
    found: dict[str, Any] = {}
    for where in (model, model.get("runtime") or {}):
        for key, value in where.items():
            if "dtype" in key or "precision" in key:
                found[key] = value
    return {
        "device": model.get("device"),
        "dtype": found.get("dtype"),
        "dtype_fields": found,
        "architecture": model.get("architecture"),
        "input_size": model.get("input_size"),
        "classes": len(model.get("classes") or []),
        "parameters": (model.get("size") or {}).get("parameters"),
        "concept_layers": model.get("concept_layers"),
        "runtime": model.get("runtime"),
    }


def measure_model(
    name: str,
    artifact: Path,
    home: Path,
    out: Path,
    sizes: Sizes,
    dtype: str,
    device: str,
    until: float,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """Serve ``artifact`` and measure its endpoints until about ``until`` (``time.monotonic()``).

    The rows share the time left once the server is ready (at least ``sizes.min_rows_s``); each row
    sends at least one request per client whatever the time.

    ``home``: the server's BENTOML_HOME (its log is copied to ``out``/server-NAME.log); ``pool``: processes
    that check the responses after each row (None: this process).

    Returns the model's report: ``model`` (:func:`_model_summary`), ``startup_s``, ``rows`` (one
    dict per :class:`Row`, :func:`run_row`'s stats), ``checks`` (responses, explanations, heatmaps,
    failed, worst residual, the first problems), ``metrics`` (:func:`parse_metrics`) and ``problems``
    of the metrics themselves.
    """
    from benchmarks.service_scale import photographs
    from tests._support.server import http, metrics_text_of, running_server

    home.mkdir(parents=True, exist_ok=True)
    env = {
        # running_server puts only the repository on the server's path: keep ours too (on the lent
        # machine it holds the carried wheels, bentoml among them).
        "PYTHONPATH": _python_path(),
        "FACT_ARTIFACT": str(artifact),
        "FACT_DEVICE": device,
        "FACT_DTYPE": dtype,
        "FACT_MAX_BATCH_ITEMS": str(max(32, sizes.batch_items)),
        # Generous: the load must be measured, not shed (503) or cut (504).
        "FACT_REQUEST_TIMEOUT": "300",
        "FACT_QUEUE_BUDGET": "600",
    }
    if device == "cpu":  # smoke: one intra-op thread (CI's 2 cores also run the kernel benchmark meanwhile)
        env["FACT_TORCH_THREADS"] = "1"
    images = photographs()
    bound = RESIDUAL_BOUNDS[dtype]
    result: dict[str, Any] = {"artifact": str(artifact), "env": env, "rows": []}
    started = time.monotonic()
    try:
        with running_server(home, env=env, startup_timeout=sizes.startup_timeout_s) as url:
            result["startup_s"] = time.monotonic() - started
            log.info("%s: server ready after %.1f s", name, result["startup_s"])
            status, model = http("GET", f"{url}/model")
            if status != 200:
                raise RuntimeError(f"GET /model answered {status}: {model!r:.300}")
            result["model"] = _model_summary(model)
            side = int(model["input_size"])
            n = sizes.clients
            rows = [
                Row("/predict ×1", "/predict", 1, sizes.requests["predict"], 1, _bodies("/predict", images, 1)),
                Row("/explain ×1", "/explain", 1, sizes.requests["explain"], 1, _bodies("/explain", images, 1)),
                Row(f"/explain ×{n}", "/explain", n, sizes.requests["explain_loaded"], 1,
                    _bodies("/explain", images, 1)),
                Row("/explain_batch ×1", "/explain_batch", 1, sizes.requests["batch"], sizes.batch_items,
                    _bodies("/explain_batch", images, sizes.batch_items)),
                Row(f"/explain_batch ×{n}", "/explain_batch", n, sizes.requests["batch_loaded"], sizes.batch_items,
                    _bodies("/explain_batch", images, sizes.batch_items)),
            ]  # fmt: skip
            checks = ResponseCheck()
            end = max(until, time.monotonic() + sizes.min_rows_s)
            for i, row in enumerate(rows):
                share = (end - time.monotonic()) / (len(rows) - i)
                stats, responses = run_row(url, row, sizes.warmup, time.monotonic() + share, timeout=330)
                checked = check_responses(row.route, responses, bound, side, row.items, row.name, pool)
                stats |= {"checked": checked.responses, "failed": checked.failed,
                          "worst_residual": checked.worst_residual if checked.explanations else None}  # fmt: skip
                checks.add(checked)
                result["rows"].append(stats)
                log.info("%s %s: %d requests, p50 %.1f ms, %.1f images/s, %d failed", name, row.name,
                         stats["requests"], stats["p50_ms"], stats["images_per_s"], checked.failed)  # fmt: skip
            result["metrics"] = parse_metrics(metrics_text_of(url))
    finally:
        for i, server_log in enumerate(sorted(home.glob("server-*.log"))):
            target = out / f"server-{name}{'' if i == 0 else f'-{i}'}.log"
            target.write_bytes(server_log.read_bytes())
            _tail(target)
    result["checks"] = {
        "responses": checks.responses,
        "explanations": checks.explanations,
        "heatmaps": checks.heatmaps,
        "failed": checks.failed,
        "worst_residual": checks.worst_residual if checks.explanations else None,
        "residual_bound": bound,
        "problems": checks.problems[:20],
    }
    result["metrics_problems"] = _metrics_problems(result["metrics"], device)
    return result


def _metrics_problems(metrics: Mapping[str, Any], device: str) -> list[str]:
    """What ``/metrics`` lacks after the load: the explain stage histograms, and on CUDA the memory gauge."""
    problems = [
        f"no fact_explain_stage_seconds for {endpoint}"
        for endpoint in ("explain", "explain_batch")
        if not metrics["stage_ms"].get(endpoint)
    ]
    if device == "cuda" and metrics["gpu"].get("fact_gpu_memory_bytes") is None:
        problems.append("no fact_gpu_memory_bytes on a CUDA server")
    return problems


# ----------------------------------------------------------------------------- goals


def _rate(value: float) -> str:
    """A rate in images/s as text: whole numbers from 100 on, three significant digits below."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _goal(key: str, status: str, figure: str, **extra: Any) -> dict[str, Any]:
    target = GOALS[key]
    direction = "≤" if key in ("layer_vs_cudnn", "explain_vs_predict") else "≥"
    unit = " images/s" if key == "explained_images_per_s" else "×"
    return {"goal": key, "name": GOAL_NAMES[key], "target": f"{direction} {target:g}{unit}", "status": status,
            "figure": figure, **extra}  # fmt: skip


def _row_of(model: Mapping[str, Any] | None, route: str, clients: int | None = None) -> dict[str, Any] | None:
    """The measured row of ``route`` at ``clients`` (None: the one with the most images/s)."""
    rows = [r for r in (model or {}).get("rows", []) if r["route"] == route and (clients is None or
            r["clients"] == clients)]  # fmt: skip
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def evaluate_goals(kernels: Mapping[str, Any] | None, models: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The five goals, each ``met``, ``missed`` or ``not measured``, with the figure it was judged on.

    Args:
        kernels: :func:`summarise_kernels` of the kernel benchmark (None when it did not run).
        models: model name → :func:`measure_model`'s report (``resnet50``: the ResNet-50 FaCT model).

    Returns:
        One dict per goal of :data:`GOALS`, in that order: ``goal``, ``name``, ``target``, ``status``,
        ``figure`` (text), and the numbers behind it.
    """
    kernels = kernels or {}
    goals = []

    # 1. explain, kernels on vs off: the better of the looped and the batched-VJP ratio.
    e2e = kernels.get("end_to_end") or {}
    looped, batched = e2e.get("explain_speedup"), e2e.get("explain_batched_triton_speedup")
    candidates = {k: v for k, v in (("looped", looped), ("batched VJP", batched)) if v is not None}
    if candidates:
        which = max(candidates, key=candidates.__getitem__)
        best = candidates[which]
        parts = ", ".join(f"{k} {v:.2f}×" for k, v in candidates.items())
        goals.append(_goal("explain_speedup", "met" if best >= GOALS["explain_speedup"] else "missed",
                           f"{parts}; judged on {which}", best=best, which=which))  # fmt: skip
    else:
        goals.append(_goal("explain_speedup", "not measured", "no end-to-end figures"))

    # 2. B-cos layer (dispatched) vs bare cuDNN on every ResNet-50 shape, per dtype.
    resnet = [r for r in kernels.get("layers") or [] if "resnet" in str(r.get("net"))]
    measured = [r for r in resnet if not r.get("skipped") and r.get("vs_floor") is not None]
    skipped = len(resnet) - len(measured)
    worst: dict[str, dict[str, Any]] = {}
    for r in measured:
        if r["dtype"] not in worst or r["vs_floor"] > worst[r["dtype"]]["vs_floor"]:
            worst[r["dtype"]] = r
    if not worst:
        goals.append(_goal("layer_vs_cudnn", "not measured", "no ResNet-50 layer timings"))
    else:
        text = "; ".join(f"{d} worst {r['vs_floor']:.2f}× ({r['layer']})" for d, r in sorted(worst.items()))
        if skipped:
            text += f"; {skipped} of {len(resnet)} shapes not timed (budget)"
        over = any(r["vs_floor"] > GOALS["layer_vs_cudnn"] for r in worst.values())
        status = "missed" if over else "not measured" if skipped else "met"
        by_dtype = {d: {"ratio": r["vs_floor"], "layer": r["layer"]} for d, r in worst.items()}
        goals.append(_goal("layer_vs_cudnn", status, text, worst=by_dtype))

    # 3. concept encode vs matmul+topk at K = 16384, the dispatched path, per dtype.
    encode = [r for r in kernels.get("encode") or [] if f"K={ENCODE_GOAL_K}" in str(r.get("shape"))]
    picked: dict[str, dict[str, Any]] = {}
    for r in encode:
        if r.get("speedup") is None:
            continue
        if r.get("dispatch_pick") or r["dtype"] not in picked:
            picked[r["dtype"]] = r
    if not picked:
        goals.append(_goal("encode_speedup", "not measured", f"no encode timings at K={ENCODE_GOAL_K}"))
    else:
        text = "; ".join(f"{d} {r['speedup']:.2f}× ({r.get('path')})" for d, r in sorted(picked.items()))
        met = all(r["speedup"] >= GOALS["encode_speedup"] for r in picked.values())
        goals.append(_goal("encode_speedup", "met" if met else "missed", text,
                           speedups={d: r["speedup"] for d, r in picked.items()}))  # fmt: skip

    # 4. ResNet-50 FaCT, top-5 maps: explained images/s through /explain_batch (and the library's figure).
    row = _row_of(models.get("resnet50"), "/explain_batch")
    library = max((e2e.get(k) or 0.0 for k in ("explain_triton_images_per_s", "explain_batched_triton_images_per_s")),
                  default=0.0) or None  # fmt: skip
    library_text = f"; library {_rate(library)} images/s at batch {e2e.get('batch')}" if library else ""
    if row is None:
        goals.append(_goal("explained_images_per_s", "not measured", "no /explain_batch figure" + library_text,
                           library=library))  # fmt: skip
    else:
        rate = row["images_per_s"]
        goals.append(_goal("explained_images_per_s", "met" if rate >= GOALS["explained_images_per_s"] else "missed",
                           f"/explain_batch of {row['items']} at {row['clients']} clients: {_rate(rate)} images/s"
                           + library_text, service=rate, library=library))  # fmt: skip

    # 5. single-image /explain p50 vs /predict p50, per model.
    ratios = {}
    for name, model in models.items():
        explain, predict = _row_of(model, "/explain", 1), _row_of(model, "/predict", 1)
        if explain and predict and predict["p50_ms"] > 0:
            ratios[name] = explain["p50_ms"] / predict["p50_ms"]
    if not ratios:
        goals.append(_goal("explain_vs_predict", "not measured", "no /explain and /predict figures"))
    else:
        met = all(r <= GOALS["explain_vs_predict"] for r in ratios.values())
        text = "; ".join(f"{name} {r:.2f}×" for name, r in ratios.items())
        goals.append(_goal("explain_vs_predict", "met" if met else "missed", text, ratios=ratios))
    return goals


def correctness_summary(kernels: Mapping[str, Any] | None, models: Mapping[str, Any]) -> dict[str, Any]:
    """Whether every correctness check passed: kernel rows (present, all ok), responses, metrics."""
    problems = []
    rows = (kernels or {}).get("correctness") or {}
    if not rows.get("rows"):
        problems.append("no kernel correctness rows")
    elif rows["ok"] != rows["rows"]:
        problems.append(f"{rows['rows'] - rows['ok']} kernel rows failed")
    for name, model in models.items():
        checks = model.get("checks") or {}
        if not checks.get("responses"):
            problems.append(f"{name}: no responses checked")
        elif checks.get("failed"):
            problems.append(f"{name}: {checks['failed']} responses failed")
        problems += [f"{name}: {p}" for p in model.get("metrics_problems", [])]
    return {"passed": not problems, "problems": problems}


# ----------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f} MiB"


def tables(report: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables as ``(title, columns, rows of text)``: one source for markdown and the console."""
    out = []
    models = report.get("models", {})
    service_rows = []
    for name, model in models.items():
        for r in model.get("rows", []):
            service_rows.append([
                name, r["route"], str(r["clients"]), str(r["items"]), str(r["requests"]), _fmt(r["p50_ms"]),
                _fmt(r["p95_ms"]), _fmt(r["images_per_s"]), f"{r['checked'] - r['failed']}/{r['checked']}",
            ])  # fmt: skip
    out.append(("Service (top-5 concepts, PNG heatmaps)",
                ["model", "endpoint", "clients", "images/request", "requests", "p50 ms", "p95 ms", "images/s",
                 "responses ok"], service_rows))  # fmt: skip
    stage_rows = []
    for name, model in models.items():
        stages = (model.get("metrics") or {}).get("stage_ms", {})
        for endpoint, by_stage in stages.items():
            stage_rows.append([name, endpoint, ", ".join(f"{s} {ms:.1f}" for s, ms in by_stage.items())])
    out.append(("Server stages (mean ms per observation, /metrics)", ["model", "endpoint", "stages"], stage_rows))
    gpu_rows = []
    for name, model in models.items():
        gpu = (model.get("metrics") or {}).get("gpu", {})
        info = model.get("model") or {}
        gpu_rows.append([
            name, str(info.get("device")), str(info.get("dtype")), _mib(gpu.get("fact_gpu_memory_bytes")),
            _mib(gpu.get("fact_gpu_memory_reserved_bytes")), _mib(gpu.get("fact_gpu_memory_peak_bytes")),
            _mib(gpu.get("fact_gpu_device_memory_used_bytes")), _fmt(gpu.get("fact_gpu_utilisation_ratio"), ".0%"),
            _fmt(model.get("startup_s")),
        ])  # fmt: skip
    out.append(("Server device and memory (/model, /metrics after the load)",
                ["model", "device", "dtype", "allocated", "reserved", "peak", "device used", "utilisation",
                 "ready after s"], gpu_rows))  # fmt: skip
    out.append(("Kernels (python -m benchmarks.gpu_kernels)", ["measure", "figure"], _kernel_rows(report)))
    profile = ((report.get("kernels") or {}).get("end_to_end") or {}).get("explain_profile") or {}
    if profile:  # CUDA only: where the time of one explain call goes, per FACT_KERNELS mode
        out.append((
            f"Explain profile (GPU kernels of one explain call, top {PROFILE_ROWS} by time)",
            ["FACT_KERNELS", "kernel", "calls", "GPU ms"],
            [[mode, row["name"][:90], str(row["calls"]), f"{row['total_ms']:.2f}"]
             for mode, rows in profile.items() for row in rows[:PROFILE_ROWS]],
        ))  # fmt: skip
    smoke = " — smoke run on the CPU: figures meaningless" if report.get("smoke") else ""
    out.append((f"Goals{smoke}", ["goal", "target", "figure", "status"],
                [[g["name"], g["target"], g["figure"], g["status"]] for g in report.get("goals", [])]))  # fmt: skip
    kernels = report.get("kernels") or {}
    correctness = kernels.get("correctness") or {}
    check_rows = [[
        "kernel rows (gpu_kernels)", f"{correctness.get('ok', 0)}/{correctness.get('rows', 0)} ok",
        f"worst rel err {_fmt(correctness.get('worst_rel_err'), '.1e')}" if correctness else "not run",
    ]]  # fmt: skip
    for name, model in models.items():
        checks = model.get("checks") or {}
        metrics_ok = "metrics ok" if not model.get("metrics_problems") else "; ".join(model["metrics_problems"])
        responses = checks.get("responses", 0)
        check_rows.append([
            f"{name} responses", f"{responses - checks.get('failed', 0)}/{responses} ok",
            f"worst residual {_fmt(checks.get('worst_residual'), '.1e')} (bound {checks.get('residual_bound', 0):g}), "
            f"{checks.get('heatmaps', 0)} heatmaps; {metrics_ok}",
        ])  # fmt: skip
    for problem in (report.get("correctness") or {}).get("problems", []):
        check_rows.append(["problem", "FAILED", problem])
    passed = (report.get("correctness") or {}).get("passed")
    out.append((f"Correctness: {'all checks passed' if passed else 'FAILED'}", ["check", "result", "detail"],
                check_rows))  # fmt: skip
    return out


def _kernel_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """The kernel benchmark's headline figures: end to end, concept encode, B-cos layers vs cuDNN."""
    kernels = report.get("kernels") or {}
    rows = []
    e2e = kernels.get("end_to_end")
    if e2e:
        shape = f"{e2e.get('arch')} batch {e2e.get('batch')}, {e2e.get('size')} px, K={e2e.get('K')}"
        rate = {
            k: "–" if e2e.get(k) is None else _rate(e2e[k])
            for k in (
                "explain_torch_images_per_s",
                "explain_triton_images_per_s",
                "explain_batched_triton_images_per_s",
            )
        }
        rows.append([
            f"explain images/s ({shape})",
            f"kernels off {rate['explain_torch_images_per_s']}, on {rate['explain_triton_images_per_s']} "
            f"({_fmt(e2e.get('explain_speedup'), '.2f')}×), on + batched VJPs "
            f"{rate['explain_batched_triton_images_per_s']} "
            f"({_fmt(e2e.get('explain_batched_triton_speedup'), '.2f')}×)",
        ])  # fmt: skip
    for r in kernels.get("encode") or []:
        rows.append([f"concept encode {r['dtype']} {r['shape']} [{r.get('path')}]" + (" (dispatched)" if
                     r.get("dispatch_pick") else ""), f"{_fmt(r.get('ours_ms'), '.3f')} ms vs matmul+topk "
                     f"{_fmt(r.get('baseline_ms'), '.3f')} ms: {_fmt(r.get('speedup'), '.2f')}×"])  # fmt: skip
    layers = [r for r in kernels.get("layers") or [] if not r.get("skipped") and r.get("vs_floor") is not None]
    for net, dtype in sorted({(r["net"], r["dtype"]) for r in layers}):
        ratios = sorted(r["vs_floor"] for r in layers if (r["net"], r["dtype"]) == (net, dtype))
        rows.append([f"B-cos layers of {net} {dtype}, dispatched ÷ cuDNN ({len(ratios)} shapes)",
                     f"median {statistics.median(ratios):.2f}×, worst {ratios[-1]:.2f}×"])  # fmt: skip
    return rows


def markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: a heading with the command and the machine, then every table."""
    lines = [
        f"## GPU endpoint ({report['date']})",
        "",
        f"`{report['command']}` on {report['device_name']}, torch {report['torch']}, triton {report['triton']}, "
        f"dtype {report['dtype']}, {report['seconds']:.0f} s.",
        "",
    ]
    for title, columns, rows in tables(report):
        lines += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines).rstrip() + "\n"


def _print_tables(report: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for note in report.get("notes", []):
        console.print(f"note: {note}")
    for title, columns, rows in tables(report):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"{report['device_name']}  torch {report['torch']}  triton {report['triton']}  "
                  f"dtype {report['dtype']}  total {report['seconds']:.0f} s")  # fmt: skip


# ----------------------------------------------------------------------------- main


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models and few requests (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/gpu_endpoint"))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (about)")
    parser.add_argument("--dtype", choices=sorted(RESIDUAL_BOUNDS), default="float32", help="the servers' FACT_DTYPE")
    parser.add_argument("--models", default="default,resnet50", help="comma-separated: default, resnet50")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmark (its goals: not measured)")
    parser.add_argument(
        "--check-workers",
        type=int,
        help="processes that check the responses (default: none with --smoke, else up to 8: half the cores)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.models.split(",")) - {"default", "resnet50"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}: choose from default, resnet50")
    return args


def _header(argv: list[str] | None, args: argparse.Namespace, device: str) -> dict[str, Any]:
    from importlib import metadata

    import torch
    import triton

    versions = {}
    for package in ("bentoml", "pydantic", "starlette", "typing-extensions", "numpy", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    shown = sys.argv[1:] if argv is None else argv
    return {
        "command": shlex.join(["python", "-m", "benchmarks.gpu_endpoint", *shown]),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "packages": versions,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "dtype": args.dtype,
        "budget_s": args.budget,
        "notes": [],
    }


def _artifacts(names: Iterable[str], home: Path, sizes: Sizes) -> dict[str, Callable[[], Path]]:
    from fact_model.artifacts import resolve_artifact_path

    def scale() -> Path:
        from benchmarks.scale_artifact import build_scale_artifact

        started = time.monotonic()
        path = build_scale_artifact(home / "resnet50-artifact", **sizes.scale_model)
        log.info("built %s in %.1f s", path, time.monotonic() - started)
        return path

    makers = {"default": lambda: resolve_artifact_path("default"), "resnet50": scale}
    return {name: makers[name] for name in names}


def finish(report: dict[str, Any], out: Path, names: list[str], kernels_wanted: bool) -> bool:
    """Judge the goals and the checks of what ``report`` holds so far and write the JSON and markdown.

    Called after every section, so that a run stopped from outside (the device call's time limit)
    still leaves what it measured. Returns whether every correctness check passed.
    """
    kernels, models = report.get("kernels"), report.get("models", {})
    report["goals"] = evaluate_goals(kernels, models)
    correctness = correctness_summary(kernels, models)
    if not kernels_wanted:  # --no-kernels: asked for, not a failed check
        correctness["problems"].remove("no kernel correctness rows")
    correctness["problems"] += [f"{name}: not measured" for name in names if name not in models]
    correctness["problems"] += [note for note in report["notes"] if "FAILED" in note]
    correctness["passed"] = not correctness["problems"]
    report["correctness"] = correctness
    report["seconds"] = report["budget"].elapsed() if "budget" in report else report.get("seconds", 0.0)
    shown = {k: v for k, v in report.items() if k != "budget"}
    (out / "gpu_endpoint.json").write_text(json.dumps(shown, indent=1, default=str))
    (out / "gpu_endpoint.md").write_text(markdown(shown))
    return correctness["passed"]


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or use --smoke", file=sys.stderr)
        return 2
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    names = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget)
    report = _header(argv, args, device) | {"budget": budget, "models": {}}
    sections = Sections({"kernels", "models"}, budget, args.budget, report)

    def write() -> bool:
        return finish(report, args.out, names, not args.no_kernels)

    def kernels_done(benchmark: KernelBenchmark) -> None:
        report["kernels"] = sections.run("kernels", lambda: benchmark.result(kernel_timeout))
        report["notes"] += [f"kernels: {note}" for note in (report["kernels"] or {}).get("notes", [])]
        write()

    kernel_budget = KERNEL_SHARE * args.budget
    kernel_timeout = kernel_budget + (300 if args.smoke else 90)  # past its own budget: a section overran
    benchmark = None
    if not args.no_kernels:
        benchmark = sections.run(
            "kernels:start",
            lambda: KernelBenchmark(args.out / "kernels", kernel_budget, args.smoke, sizes.kernels_args),
        )
    # On the GPU the kernel benchmark runs alone (its timings must not share the device with a server);
    # in smoke mode it overlaps the model sections, to keep CI short.
    if benchmark is not None and not args.smoke:
        kernels_done(benchmark)

    # On the GPU machine (16 cores) the responses are checked in parallel, between the rows; CI has 2 cores.
    workers = args.check_workers
    if workers is None:
        workers = 0 if args.smoke else min(8, (os.cpu_count() or 2) // 2)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers >= 1 else None
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.enter_context(pool)
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_endpoint-")))
        for i, (name, make) in enumerate(_artifacts(names, home, sizes).items()):
            # Each model gets its part of what is left (its server's start included); ResNet-50 three
            # times the tiny default's. 10 s stay for the report.
            weights = [1.0 if n == "default" else 3.0 for n in names[i:]]
            until = time.monotonic() + (budget.left() - 10) * weights[0] / sum(weights)
            result = sections.run(
                f"models:{name}",
                lambda make=make, name=name, until=until: measure_model(
                    name, make(), home / name, args.out, sizes, args.dtype, device, until, pool
                ),
            )
            if result is not None:
                report["models"][name] = result
            write()
    if benchmark is not None and args.smoke:
        kernels_done(benchmark)

    passed = write()
    _print_tables(report)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
