"""``python -m benchmarks.gpu_endpoint``: the GPU endpoint benchmark, its checks, goals and wheel list.

The script runs once on a lent GPU per session that has one; CI keeps it working with ``--smoke``
(the whole script on the CPU at tiny sizes) and checks its parts on hand-made inputs.
"""

from __future__ import annotations

import base64
import io
import json
import re
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.gpu_endpoint import (
    GOALS,
    check_response,
    correctness_summary,
    evaluate_goals,
    markdown,
    parse_metrics,
)

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


# ----------------------------------------------------------------------------- the smoke run


@pytest.mark.slow  # two real servers and the kernel benchmark in the Triton interpreter (~80 s on 2 cores)
def test_smoke_run_measures_and_checks_both_models(endpoint_smoke):
    result, tmp_path = endpoint_smoke.result, endpoint_smoke.out
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_endpoint.json").read_text())
    assert report["smoke"] and report["correctness"]["passed"]
    assert not [n for n in report["notes"] if "FAILED" in n]

    assert set(report["models"]) == {"default", "resnet50"}
    for name, model in report["models"].items():
        rows = {(r["route"], r["clients"]) for r in model["rows"]}
        assert rows == {("/predict", 1), ("/explain", 1), ("/explain", 16), ("/explain_batch", 1),
                        ("/explain_batch", 16)}, name  # fmt: skip
        for r in model["rows"]:
            assert 0 < r["p50_ms"] <= r["p95_ms"], (name, r)
            assert r["requests"] >= r["clients"] and r["images_per_s"] > 0 and r["failed"] == 0, (name, r)
        checks = model["checks"]
        assert checks["responses"] > 0 and checks["failed"] == 0, (name, checks)
        assert checks["explanations"] > 0 and checks["heatmaps"] > 0
        assert checks["worst_residual"] <= 1e-4
        assert model["model"]["device"] == "cpu"
        assert model["metrics"]["stage_ms"]["explain"]["backward"] > 0
        assert model["metrics"]["gpu"]["fact_gpu_memory_bytes"] is None  # no GPU gauges on the CPU
    assert report["models"]["resnet50"]["model"]["architecture"] == "bcos_resnet8"  # the smoke stand-in

    kernels = report["kernels"]
    assert kernels["correctness"]["rows"] > 0 and kernels["correctness"]["ok"] == kernels["correctness"]["rows"]
    assert all(row["ok"] for row in kernels["report"]["correctness"])
    assert kernels["end_to_end"]["explain_speedup"] > 0

    goals = {g["goal"]: g for g in report["goals"]}
    assert set(goals) == set(GOALS) and len(report["goals"]) == 5
    assert all(g["status"] in ("met", "missed", "not measured") for g in goals.values())
    assert goals["explain_vs_predict"]["status"] != "not measured"  # both models measured it

    text = (tmp_path / "gpu_endpoint.md").read_text()
    assert "| model | endpoint | clients |" in text and "| goal | target | figure | status |" in text
    assert "python -m benchmarks.gpu_endpoint --smoke" in text
    tail = "\n".join(result.stdout.splitlines()[-12:])  # the tables are the last lines printed
    assert "Correctness: all checks passed" in tail and "kernel rows" in tail and "Goals" in result.stdout

    # What the device tool brings back from $OUT: ≤ 8 files, ≤ 2 folders deep, plain names.
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for path in files:
        parts = path.relative_to(tmp_path).parts
        assert len(parts) <= 3 and all(NAME.match(part) for part in parts), path
        assert path.stat().st_size <= 16 * 2**20


# ----------------------------------------------------------------------------- goals


def _kernels(explain=1.2, batched=1.7, worst_layer=1.1, encode=2.0, images=350.0, skipped=False):
    layers = [
        {"net": "bcos_v2_resnet50", "layer": "64→64 3×3 @56", "dtype": "float32", "vs_floor": 1.05},
        {"net": "bcos_v2_resnet50", "layer": "512→512 3×3 @7", "dtype": "float32", "vs_floor": worst_layer},
        {"net": "bcos_v2_resnet50", "layer": "64→64 3×3 @56", "dtype": "bfloat16", "vs_floor": 1.02},
        {"net": "bcos_v2_densenet121", "layer": "128→32 3×3 @56", "dtype": "float32", "vs_floor": 9.0},  # not R-50
    ]
    if skipped:
        layers.append({"net": "bcos_v2_resnet50", "layer": "2048→512 1×1 @7", "dtype": "bfloat16", "skipped": "budget"})
    return {
        "end_to_end": {"explain_speedup": explain, "explain_batched_triton_speedup": batched, "batch": 32,
                       "explain_triton_images_per_s": images, "explain_batched_triton_images_per_s": images / 2},
        "layers": layers,
        "encode": [
            {"dtype": "float32", "shape": "M=3136 C=2048 K=16384 k=16", "path": "fused", "speedup": 0.9,
             "dispatch_pick": False},
            {"dtype": "float32", "shape": "M=3136 C=2048 K=16384 k=16", "path": "gemm_select", "speedup": encode,
             "dispatch_pick": True},
            {"dtype": "float32", "shape": "M=40 C=48 K=200 k=8", "path": "fused", "speedup": 0.1},  # not K=16384
        ],
    }  # fmt: skip


def _model(predict_p50, explain_p50, batch_rate):
    def row(route, clients, p50, rate, items=1):
        return {"route": route, "clients": clients, "items": items, "p50_ms": p50, "images_per_s": rate}

    return {"rows": [row("/predict", 1, predict_p50, 1e3 / predict_p50), row("/explain", 1, explain_p50, 10.0),
                     row("/explain", 16, 5 * explain_p50, 12.0), row("/explain_batch", 1, 100.0, batch_rate / 2, 32),
                     row("/explain_batch", 16, 900.0, batch_rate, 32)]}  # fmt: skip


def _statuses(goals):
    return {g["goal"]: g["status"] for g in goals}


def test_goals_met_when_every_figure_is_on_the_right_side():
    goals = evaluate_goals(_kernels(), {"default": _model(2.0, 6.0, 900.0), "resnet50": _model(10.0, 39.0, 320.0)})
    assert [g["goal"] for g in goals] == list(GOALS)
    assert set(_statuses(goals).values()) == {"met"}
    by_goal = {g["goal"]: g for g in goals}
    assert by_goal["explain_speedup"]["which"] == "batched VJP" and by_goal["explain_speedup"]["best"] == 1.7
    assert "looped 1.20×" in by_goal["explain_speedup"]["figure"]
    assert by_goal["layer_vs_cudnn"]["worst"]["float32"] == {"ratio": 1.1, "layer": "512→512 3×3 @7"}
    assert by_goal["encode_speedup"]["speedups"] == {"float32": 2.0}  # the dispatched path, at K = 16384
    assert by_goal["explained_images_per_s"]["service"] == 320.0  # ResNet-50's best /explain_batch row
    assert by_goal["explained_images_per_s"]["library"] == 350.0
    assert by_goal["explain_vs_predict"]["ratios"] == {"default": 3.0, "resnet50": 3.9}


def test_goals_missed_when_a_figure_is_on_the_wrong_side():
    kernels = _kernels(explain=1.4, batched=1.1, worst_layer=1.3, encode=1.2)
    goals = evaluate_goals(kernels, {"default": _model(2.0, 6.0, 900.0), "resnet50": _model(10.0, 41.0, 299.0)})
    assert set(_statuses(goals).values()) == {"missed"}
    by_goal = {g["goal"]: g for g in goals}
    assert by_goal["explain_speedup"]["which"] == "looped"
    assert "512→512 3×3 @7" in by_goal["layer_vs_cudnn"]["figure"]
    assert "resnet50 4.10×" in by_goal["explain_vs_predict"]["figure"]


def test_goals_not_measured_without_their_figures():
    goals = evaluate_goals(None, {})
    assert set(_statuses(goals).values()) == {"not measured"} and len(goals) == 5
    # A layer shape skipped for the budget leaves "every shape" unproven, unless one measured already misses.
    assert _statuses(evaluate_goals(_kernels(skipped=True), {}))["layer_vs_cudnn"] == "not measured"
    assert _statuses(evaluate_goals(_kernels(skipped=True, worst_layer=2.0), {}))["layer_vs_cudnn"] == "missed"
    # Only the ResNet-50 model's /explain_batch counts; the library's figure alone does not judge the goal.
    statuses = _statuses(evaluate_goals(_kernels(), {"default": _model(2.0, 6.0, 900.0)}))
    assert statuses["explained_images_per_s"] == "not measured" and statuses["explain_vs_predict"] == "met"


def test_markdown_of_a_gpu_report_has_every_table():
    """The tables that only a GPU run fills (kernel figures, GPU memory) render from a hand-made report."""
    kernels = _kernels() | {"correctness": {"rows": 10, "ok": 10, "worst_rel_err": 2e-3}}
    kernels["end_to_end"]["explain_profile"] = {
        mode: [{"name": f"{mode}_kernel_{i}", "calls": i + 1, "total_ms": 20.0 - i} for i in range(20)]
        for mode in ("torch", "triton")
    }
    models = {"resnet50": _model(10.0, 39.0, 320.0)}
    models["resnet50"] |= {
        "checks": {"responses": 5, "failed": 0, "worst_residual": 3e-3, "heatmaps": 800, "residual_bound": 1e-2},
        "metrics": parse_metrics(METRICS_TEXT),
        "metrics_problems": [],
        "model": {"device": "cuda", "dtype": "tf32"},
        "startup_s": 61.0,
    }
    for row in models["resnet50"]["rows"]:
        row |= {"requests": 8, "p95_ms": 2 * row["p50_ms"], "checked": 8, "failed": 0}
    report = {"date": "2026-12-02", "command": "python -m benchmarks.gpu_endpoint", "device_name": "NVIDIA H200",
              "torch": "2.11.0", "triton": "3.6.0", "dtype": "tf32", "seconds": 400.0, "smoke": False, "notes": [],
              "kernels": kernels, "models": models, "goals": evaluate_goals(kernels, models),
              "correctness": correctness_summary(kernels, models)}  # fmt: skip
    assert report["correctness"] == {"passed": True, "problems": []}
    text = markdown(report)
    assert "on NVIDIA H200, torch 2.11.0, triton 3.6.0, dtype tf32" in text
    assert "| resnet50 | cuda | tf32 | 1431 MiB |" in text  # 1.5e9 bytes allocated
    assert "75%" in text and "B-cos layers of bcos_v2_resnet50 float32, dispatched ÷ cuDNN (2 shapes)" in text
    assert "| ResNet-50 explained images/s | ≥ 300 images/s |" in text and "smoke" not in text
    assert "Correctness: all checks passed" in text and "| resnet50 responses | 5/5 ok |" in text
    assert "| triton | triton_kernel_0 | 1 | 20.00 |" in text
    assert "torch_kernel_11" in text and "torch_kernel_12" not in text  # the top 12 per mode


# ----------------------------------------------------------------------------- metrics


METRICS_TEXT = """\
# HELP fact_explain_stage_seconds Explain latency by stage
# TYPE fact_explain_stage_seconds histogram
fact_explain_stage_seconds_bucket{endpoint="explain",le="0.01",stage="forward"} 1.0
fact_explain_stage_seconds_bucket{endpoint="explain",le="+Inf",stage="forward"} 4.0
fact_explain_stage_seconds_sum{endpoint="explain",stage="forward"} 0.1
fact_explain_stage_seconds_count{endpoint="explain",stage="forward"} 4.0
fact_explain_stage_seconds_bucket{endpoint="explain_batch",le="+Inf",stage="render"} 2.0
fact_explain_stage_seconds_sum{endpoint="explain_batch",stage="render"} 0.5
fact_explain_stage_seconds_count{endpoint="explain_batch",stage="render"} 2.0
fact_explain_stage_seconds_bucket{endpoint="intervene",le="+Inf",stage="forward"} 0.0
fact_explain_stage_seconds_sum{endpoint="intervene",stage="forward"} 0.0
fact_explain_stage_seconds_count{endpoint="intervene",stage="forward"} 0.0
# HELP fact_gpu_memory_bytes CUDA memory allocated by the worker's tensors
# TYPE fact_gpu_memory_bytes gauge
fact_gpu_memory_bytes{device="cuda:0"} 1.5e+09
# HELP fact_gpu_utilisation_ratio Share of the driver's last sample period in which a kernel ran
# TYPE fact_gpu_utilisation_ratio gauge
fact_gpu_utilisation_ratio{device="cuda:0"} 0.75
# HELP fact_http_requests_total Answered HTTP requests
# TYPE fact_http_requests_total counter
fact_http_requests_total{method="POST",route="explain",status="200"} 4.0
"""


def test_parse_metrics_takes_stage_means_and_gpu_gauges():
    metrics = parse_metrics(METRICS_TEXT)
    assert metrics["stage_ms"] == {"explain": {"forward": pytest.approx(25.0)},
                                   "explain_batch": {"render": pytest.approx(250.0)}}  # fmt: skip
    assert metrics["stage_count"] == {"explain": {"forward": 4}, "explain_batch": {"render": 2}}
    assert metrics["gpu"]["fact_gpu_memory_bytes"] == 1.5e9
    assert metrics["gpu"]["fact_gpu_utilisation_ratio"] == 0.75
    assert metrics["gpu"]["fact_gpu_memory_reserved_bytes"] is None  # absent from the page


def test_parse_metrics_of_a_cpu_server_has_no_gpu_figures():
    metrics = parse_metrics("\n".join(METRICS_TEXT.splitlines()[:10]) + "\n")
    assert set(metrics["gpu"].values()) == {None} and metrics["stage_ms"]["explain"]


# ----------------------------------------------------------------------------- response checks


def _png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (200, 30, 30, 128)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _record(residual: float = 1e-7, side: int = 32, concepts: int = 2) -> dict:
    heatmap = {"format": "png", "size": [side, side], "png_base64": _png(side)}
    return {
        "completeness": {"residual": residual, "relative_residual": residual},
        "concepts": [{"id": i, "heatmap": heatmap} for i in range(concepts)],
    }


def test_check_response_passes_a_complete_explanation_with_its_heatmaps():
    body = json.dumps(_record()).encode()
    check = check_response("/explain", 200, body, 1e-4, 32, 1)
    assert check.problems == [] and check.failed == 0
    assert (check.responses, check.explanations, check.heatmaps) == (1, 1, 2)
    assert check.worst_residual == pytest.approx(1e-7)
    batch = json.dumps({"results": [_record(), _record(3e-5)]}).encode()
    check = check_response("/explain_batch", 200, batch, 1e-4, 32, 2)
    assert check.problems == [] and check.heatmaps == 4 and check.worst_residual == pytest.approx(3e-5)
    predict = json.dumps([{"prediction": {"index": 1}, "concepts": []}]).encode()
    assert check_response("/predict", 200, predict, 1e-4, 32, 1).problems == []


@pytest.mark.parametrize(
    ("route", "status", "body", "items", "expected"),
    [
        ("/explain", 503, b'{"reason": "overloaded"}', 1, "HTTP 503"),
        ("/explain", 200, b"<html>", 1, "not JSON"),
        ("/explain", 200, json.dumps(_record(residual=2e-4)).encode(), 1, "relative residual 2.00e-04"),
        ("/explain", 200, json.dumps(_record(residual=float("nan"))).encode(), 1, "relative residual nan"),
        ("/explain", 200, json.dumps(_record(side=16)).encode(), 1, "expected PNG 32"),
        ("/explain_batch", 200, json.dumps({"results": [_record()]}).encode(), 2, "expected 2 explanation records"),
        ("/predict", 200, b"[]", 1, "expected 1 prediction records"),
    ],
)
def test_check_response_reports_what_is_wrong(route, status, body, items, expected):
    check = check_response(route, status, body, 1e-4, 32, items, tag="row #3")
    assert check.failed == 1 and any(p.startswith("row #3: ") and expected in p for p in check.problems), check


def test_check_response_refuses_a_missing_or_broken_heatmap():
    record = _record()
    record["concepts"][0]["heatmap"] = None
    record["concepts"][1]["heatmap"] = {"png_base64": base64.b64encode(b"not a png").decode()}
    check = check_response("/explain", 200, json.dumps(record).encode(), 1e-4, 32, 1)
    assert check.heatmaps == 0 and len(check.problems) == 2 and check.failed == 1
    assert "has no PNG heatmap" in check.problems[0] and "does not decode" in check.problems[1]


# ----------------------------------------------------------------------------- the wheels for the GPU machine


def _wheel_list() -> tuple[dict[str, str], set[str]]:
    """``deploy/gpu_wheels.txt``: carried ``{name: version}``, and the names it says the machine provides."""
    from packaging.utils import canonicalize_name

    carried, machine = {}, set()
    for line in (REPO / "deploy" / "gpu_wheels.txt").read_text().splitlines():
        if line.startswith("# machine:"):
            machine |= {canonicalize_name(n.strip()) for n in line.removeprefix("# machine:").split(",") if n.strip()}
        elif line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            assert canonicalize_name(name) not in carried, f"{name} listed twice"
            carried[canonicalize_name(name)] = version
    return carried, machine


def test_gpu_wheels_cover_the_services_dependency_closure():
    """Every package bentoml, pydantic and bcos need (for Python 3.12) is carried or on the machine, not both."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    carried, machine = _wheel_list()
    assert {"bentoml", "pydantic", "pydantic-core", "starlette", "uvicorn", "bcos"} <= set(carried)
    assert not carried.keys() & machine, "carried and on the machine: the wheel would shadow the machine's own"
    assert not carried.keys() & {"torch", "numpy", "triton", "pillow", "onnxruntime-gpu"}
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}
    seen, frontier = set(), ["bentoml", "pydantic", "bcos"]
    while frontier:
        name = canonicalize_name(frontier.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. only needed on another Python): nothing to walk
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                frontier.append(requirement.name)
    missing = seen - carried.keys() - machine
    assert not missing, f"needed by the service, neither in deploy/gpu_wheels.txt nor on the machine: {missing}"
