"""Service latency benchmark: ``python -m benchmarks.service_latency`` (starts its own server on loopback).

Measures ``/predict`` and ``/explain`` (top-5 concepts, PNG heatmaps) on embedded-dataset
test images at 1 and 8 concurrent clients: latency p50/p95 and throughput, and the
ratio of ``/explain`` to ``/predict`` cost (p50 at one client). Not a test: the
numbers go to ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from fact_model.data.synthetic import SyntheticConfig, render_sample
from tests._support.server import REPO, post_json, running_server

__all__ = ["main"]


def _payloads(n: int) -> list[str]:
    config = SyntheticConfig()
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(render_sample(config, "test", i)[0]).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def _run(url: str, endpoint: str, images: list[str], clients: int, requests: int) -> dict[str, float]:
    def one(i: int) -> float:
        image = images[i % len(images)]
        body = {"images": [{"image_base64": image}]} if endpoint == "predict" else {"image_base64": image, "top_k": 5}
        start = time.perf_counter()
        status, result = post_json(f"{url}/{endpoint}", body)
        elapsed = time.perf_counter() - start
        if status != 200:
            raise RuntimeError(f"/{endpoint} answered {status}: {result}")
        return elapsed

    for i in range(min(10, requests)):  # warm-up
        one(i)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return {
        "p50_ms": 1e3 * statistics.median(latencies),
        "p95_ms": 1e3 * latencies[int(0.95 * (len(latencies) - 1))],
        "throughput": requests / wall,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in argv:  # the 224 px ResNet-50 measurement has its own options (service/bench_scale.py)
        from benchmarks.service_scale import main as scale_main

        scale_main([a for a in argv if a != "--scale"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scale",
        action="store_true",
        help="measure a 224 px ResNet-50 instead (see python -m benchmarks.service_scale -h)",
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per (endpoint, concurrency)")
    parser.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    parser.add_argument("--runtime", choices=["pytorch", "onnx"], default="pytorch", help="/predict runtime")
    parser.add_argument("--endpoints", default="predict,explain", help="comma-separated endpoints to measure")
    args = parser.parse_args(argv)
    images = _payloads(50)
    rows = {}
    with tempfile.TemporaryDirectory() as home:
        if args.url:
            url_context = None
            url = args.url
        else:
            subprocess.run([sys.executable, "-m", "service.store"], cwd=REPO, check=True, capture_output=True,
                           env={**__import__("os").environ, "BENTOML_HOME": home, "PYTHONPATH": str(REPO)})  # fmt: skip
            env = None
            if args.runtime == "onnx":
                import shutil

                from fact_model.artifacts import resolve_artifact_path
                from fact_model.onnx_export import export_onnx

                artifact = Path(home) / "onnx_model"
                shutil.copytree(resolve_artifact_path("default"), artifact)
                export_onnx(artifact)
                env = {"FACT_ARTIFACT": str(artifact), "FACT_RUNTIME": "onnx"}
            url_context = running_server(Path(home), env=env)
            url = url_context.__enter__()
        try:
            for clients in (1, 8):
                for endpoint in args.endpoints.split(","):
                    rows[(endpoint, clients)] = _run(url, endpoint, images, clients, args.requests)
        finally:
            if url_context is not None:
                url_context.__exit__(None, None, None)
    table = Table(title=f"service latency — default model ({args.runtime}), {args.requests} requests per row")
    for column in ("endpoint", "clients", "p50 ms", "p95 ms", "requests/s"):
        table.add_column(column, justify="right")
    for (endpoint, clients), r in rows.items():
        table.add_row(
            f"/{endpoint}", str(clients), f"{r['p50_ms']:.1f}", f"{r['p95_ms']:.1f}", f"{r['throughput']:.1f}"
        )
    console = Console()
    console.print(table)
    console.print(f"/predict runtime: {args.runtime}")
    if ("explain", 1) in rows and ("predict", 1) in rows:
        ratio = rows[("explain", 1)]["p50_ms"] / rows[("predict", 1)]["p50_ms"]
        console.print(f"/explain ÷ /predict (p50, 1 client): {ratio:.2f}")


if __name__ == "__main__":
    main()
