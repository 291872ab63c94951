"""Serving a 224 px model: ``python -m benchmarks.service_latency --scale`` (or ``python -m benchmarks.service_scale``).

Builds (or takes, ``--artifact``) a random-weight B-cos-v2 ResNet-50 FaCT artifact
(:mod:`benchmarks.scale_artifact`: ``layer4``, K = 16,384, k = 16, 224 px, 1,000 classes), starts a
real ``bentoml serve`` of it on loopback (:func:`tests._support.server.running_server`) and measures,
one client at a time, on natural photographs (scikit-image's astronaut, chelsea, coffee and
rocket, sent as JPEG at their own size):

* ``/predict``, ``/explain`` without heatmaps and with top-5 heatmaps in every encoding, kind and
  two sizes, ``/explain_batch`` of 4: latency p50 / p95, response bytes, and the server's own
  ``timings_ms`` (``render`` = colour maps + resizing + image encoding + base64, ``backward``),
  the scenarios taking turns request by request;
* the server's resident memory (every process of it) at idle after loading and at its peak;
* the goals: ``/explain`` with top-5 heatmaps ≤ 1.5 × the p50 without, and ≤ 150 kB per response.

Not a test: the figures go to ``docs/LOAD.md`` ("224 px ResNet-50").
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tests._support.server import http, running_server, server_rss

__all__ = ["SCENARIOS", "Scenario", "main"]

SIZE_GOAL_BYTES = 150_000
LATENCY_GOAL_RATIO = 1.5


@dataclass(frozen=True)
class Scenario:
    """One request shape: a route and the fields added to each request's body."""

    name: str
    route: str
    fields: dict[str, Any] = field(default_factory=dict)
    items: int = 1  # /explain_batch: images per request


SCENARIOS = (
    Scenario("predict", "/predict"),
    Scenario("explain none", "/explain", {"heatmaps": "none"}),
    Scenario("explain png bcos", "/explain", {"heatmaps": "png"}),
    Scenario("explain png8 bcos", "/explain", {"heatmaps": "png8"}),
    Scenario("explain webp bcos", "/explain", {"heatmaps": "webp"}),
    Scenario("explain png signed", "/explain", {"heatmaps": "png", "heatmap_kind": "signed"}),
    Scenario("explain png8 signed", "/explain", {"heatmaps": "png8", "heatmap_kind": "signed"}),
    Scenario("explain webp signed", "/explain", {"heatmaps": "webp", "heatmap_kind": "signed"}),
    Scenario("explain webp spatial", "/explain", {"heatmaps": "webp", "heatmap_kind": "spatial"}),
    Scenario("explain png bcos 112", "/explain", {"heatmaps": "png", "heatmap_size": 112}),
    Scenario(
        "explain webp signed 112", "/explain", {"heatmaps": "webp", "heatmap_kind": "signed", "heatmap_size": 112}
    ),
    Scenario("explain float32", "/explain", {"heatmaps": "float32"}),
    Scenario("explain_batch 4 none", "/explain_batch", {"heatmaps": "none"}, items=4),
    Scenario("explain_batch 4 webp", "/explain_batch", {"heatmaps": "webp"}, items=4),
)
"""Every request is for the top 5 concepts (the default ``top_k``)."""


COMPLETENESS_BOUND = 1e-4
"""Largest relative completeness residual a measured response may have (else the benchmark stops)."""


def photographs() -> list[str]:
    """Base64 JPEGs of scikit-image's natural photographs (their own sizes; the server resizes them)."""
    import base64

    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, format="JPEG", quality=90)
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def _body(scenario: Scenario, images: list[str], i: int) -> bytes:
    import json

    image = images[i % len(images)]
    if scenario.route == "/predict":
        payload: dict[str, Any] = {"images": [{"image_base64": image}]}
    elif scenario.route == "/explain_batch":
        batch = [{"image_base64": images[(i + j) % len(images)]} for j in range(scenario.items)]
        payload = {"items": batch, **scenario.fields}
    else:
        payload = {"image_base64": image, **scenario.fields}
    return json.dumps(payload).encode()


def _post(url: str, body: bytes) -> tuple[int, bytes, float]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        data = response.read()
        status = response.status
    return status, data, time.perf_counter() - started


def _server_timings(data: bytes, route: str) -> list[dict[str, float]]:
    import json

    parsed = json.loads(data)
    if route == "/explain":
        return [parsed["timings_ms"]]
    if route == "/explain_batch":
        return [r["timings_ms"] for r in parsed["results"]]
    return []


def _completeness(data: bytes, route: str) -> list[float]:
    """Relative completeness residual of every explanation in a response, recomputed from its numbers.

    ``|Σ reported contributions + other − y| / |y|`` with ``y = logit − b`` as reported (``explained``;
    ``logit − b`` itself is checked to agree within float32 rounding), and the server's own
    ``completeness.relative_residual``: the larger of the two per explanation.
    """
    import json

    parsed = json.loads(data)
    results = [parsed] if route == "/explain" else parsed.get("results", []) if route == "/explain_batch" else []
    residuals = []
    for r in results:
        total = sum(c["contribution"] for c in r["concepts"]) + r["other"]["contribution"]
        explained = r["explained"]  # y = logit − b, computed before b is added (logit − b would lose digits)
        recomputed = abs(total - explained) / max(abs(explained), 1e-6)
        if abs(r["prediction"]["logit"] - r["logit_bias"] - explained) > 1e-5 * max(1.0, abs(r["logit_bias"])):
            raise RuntimeError(f"logit − bias differs from explained beyond float32 rounding: {r['prediction']}")
        residuals.append(max(recomputed, float(r["completeness"]["relative_residual"])))
    return residuals


def measure(
    url: str, scenarios: list[Scenario], images: list[str], requests: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Per scenario: latency p50/p95 (ms), mean response bytes and the server's median stage timings.

    The scenarios take turns, one request each per round, so that a slower spell of the
    machine (other jobs on a shared box) falls on all of them alike and their ratios stay fair.
    """
    for i in range(warmup):
        for scenario in scenarios:
            _post(url + scenario.route, _body(scenario, images, i))
    latencies: dict[str, list[float]] = {s.name: [] for s in scenarios}
    sizes: dict[str, list[int]] = {s.name: [] for s in scenarios}
    stages: dict[str, dict[str, list[float]]] = {s.name: {} for s in scenarios}
    completeness: dict[str, tuple[int, float]] = {}  # explanations checked, largest relative residual
    for i in range(requests):
        for scenario in scenarios:
            status, data, seconds = _post(url + scenario.route, _body(scenario, images, i))
            if status != 200:
                raise RuntimeError(f"{scenario.name}: HTTP {status}: {data[:300]!r}")
            latencies[scenario.name].append(seconds)
            sizes[scenario.name].append(len(data))
            checked = _completeness(data, scenario.route)
            if checked:
                worst = max(checked)
                completeness[scenario.name] = (
                    completeness.get(scenario.name, (0, 0.0))[0] + len(checked),
                    max(completeness.get(scenario.name, (0, 0.0))[1], worst),
                )
                if worst > COMPLETENESS_BOUND:
                    raise RuntimeError(f"{scenario.name}: a response is not complete (relative residual {worst:.2e})")
            for timings in _server_timings(data, scenario.route):
                for stage, ms in timings.items():
                    stages[scenario.name].setdefault(stage, []).append(ms)
    rows = {}
    for scenario in scenarios:
        ordered = sorted(latencies[scenario.name])
        rows[scenario.name] = {
            "p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[int(0.95 * (len(ordered) - 1))],
            "bytes": statistics.mean(sizes[scenario.name]),
            **{f"{stage}_ms": statistics.median(v) for stage, v in stages[scenario.name].items()},
        }
        if scenario.name in completeness:
            rows[scenario.name]["explanations_checked"], rows[scenario.name]["max_relative_residual"] = completeness[
                scenario.name
            ]
    return rows


class RssSampler:
    """Samples a server's resident memory (all its processes) every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, help="serve this artifact (default: build the ResNet-50 one)")
    parser.add_argument("--requests", type=int, default=20, help="measured requests per scenario (after 2 warm-up)")
    parser.add_argument("--only", help="comma-separated scenario names to run (default: all)")
    args = parser.parse_args(argv)
    console = Console(width=140)
    images = photographs()
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only.split(",")]
    with tempfile.TemporaryDirectory() as home:
        artifact = args.artifact
        if artifact is None:
            from benchmarks.scale_artifact import build_scale_artifact

            started = time.perf_counter()
            artifact = build_scale_artifact(Path(home) / "resnet50")
            console.print(f"built {artifact} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        with running_server(Path(home), env={"FACT_ARTIFACT": str(artifact)}, startup_timeout=600) as url:
            ready_s = time.perf_counter() - started
            idle_rss = server_rss(url.pid)
            model = http("GET", f"{url}/model")[1]
            with RssSampler(url.pid) as rss:
                rows = measure(url, chosen, images, args.requests)
            peak_rss = rss.peak
    _report(console, model, rows, ready_s, idle_rss, peak_rss, args.requests)


def _report(
    console: Console,
    model: dict[str, Any],
    rows: dict[str, dict[str, float]],
    ready_s: float,
    idle_rss: int,
    peak_rss: int,
    requests: int,
) -> None:
    size = model["size"]
    console.print(
        f"model: {model['architecture']}, {size['parameters'] / 1e6:.1f} M parameters, "
        f"{size['bytes_on_disk'] / 1e6:.0f} MB on disk, input {model['input_size']} px, "
        f"{len(model['classes'])} classes, device {model['device']}, {model['torch_threads']} torch threads"
    )
    console.print(
        f"server ready after {ready_s:.1f} s; RSS idle {idle_rss / 2**20:.0f} MiB, peak {peak_rss / 2**20:.0f} MiB"
    )
    table = Table(title=f"one client, {requests} requests per row (top-5 concepts, 224 px unless a size is given)")
    for column in ("scenario", "p50 ms", "p95 ms", "kB/response", "backward ms", "render ms"):
        table.add_column(column, justify="right")
    for name, r in rows.items():
        table.add_row(
            name,
            f"{r['p50_ms']:.0f}",
            f"{r['p95_ms']:.0f}",
            f"{r['bytes'] / 1e3:.1f}",
            f"{r['backward_ms']:.0f}" if "backward_ms" in r else "",
            f"{r['render_ms']:.1f}" if "render_ms" in r else "",
        )
    console.print(table)
    checked = [
        (r["explanations_checked"], r["max_relative_residual"]) for r in rows.values() if "explanations_checked" in r
    ]
    if checked:
        console.print(
            f"completeness: {sum(n for n, _ in checked)} explanations checked in every response, largest relative "
            f"residual {max(w for _, w in checked):.1e} (bound {COMPLETENESS_BOUND:g})"
        )
    base = rows.get("explain none")
    if base is None:
        return
    for name, r in rows.items():
        if not name.startswith("explain ") or name == "explain none" or "float32" in name:
            continue
        ratio = r["p50_ms"] / base["p50_ms"]
        latency = "met" if ratio <= LATENCY_GOAL_RATIO else "missed"
        size_goal = "met" if r["bytes"] <= SIZE_GOAL_BYTES else "missed"
        console.print(
            f"{name}: p50 {ratio:.2f} × without heatmaps (goal ≤ {LATENCY_GOAL_RATIO}: {latency}); "
            f"{r['bytes'] / 1e3:.0f} kB (goal ≤ {SIZE_GOAL_BYTES / 1e3:.0f} kB: {size_goal})"
        )


if __name__ == "__main__":
    main()
