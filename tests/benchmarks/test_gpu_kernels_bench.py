"""``python -m benchmarks.gpu_kernels --smoke``: the GPU benchmark script runs end to end on the CPU interpreter.

The script is run once on a lent GPU per session that has one; CI keeps it working by
running every section at tiny shapes here, and checks what it reports.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # every benchmark section in the Triton interpreter (~70 s), inside the endpoint's smoke run
def test_smoke_run_reports_correct_kernels_and_every_section(endpoint_smoke):
    """The kernel benchmark's ``--smoke`` as the GPU endpoint script runs it (conftest.py: one run for both)."""
    assert endpoint_smoke.result.returncode == 0, endpoint_smoke.result.stdout[-3000:]
    tmp_path = endpoint_smoke.out / "kernels"
    stdout = (tmp_path / "kernels.log").read_text()
    report = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert report["smoke"] and not [n for n in report["notes"] if "FAILED" in n or "unavailable" in n]

    correctness = report["correctness"]
    kernels = {row["kernel"].split(" ")[0] + " " + row["kernel"].split("]")[-1].strip() for row in correctness}
    assert len(correctness) >= 150 and all(row["ok"] for row in correctness)
    assert {"bcos training dx", "bcos explanation dx", "bcos forward out"} <= kernels
    assert {row["dtype"] for row in correctness} == {"float32", "float16"}
    assert any(row["kernel"].startswith("concept") or "encode" in row["kernel"] for row in correctness)

    layers = report["layers"]
    assert len(layers) == 6  # 3 shapes × 2 dtypes
    for row in layers:
        assert row["cudnn_floor_ms"] > 0 and row["bcos_eager_ms"] > 0 and row["ours_dispatch_ms"] > 0
        assert row["dispatch_path"] in ("fused", "cudnn")
    assert report["concept_timings"]

    e2e = report["end_to_end"]
    assert e2e["contributions_rel_diff"] <= 1e-5
    assert e2e["max_relative_residual_on"] <= 1e-4
    assert e2e["forward_torch_images_per_s"] > 0 and e2e["explain_triton_images_per_s"] > 0
    assert "end to end" in stdout
