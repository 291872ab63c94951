"""``python -m benchmarks.sae_scaling --smoke``: one table row per process count, sane figures."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fact_model.options import TORCHRUN_VARIABLES

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # two torchrun launches, about 20 s on two cores


def _rows(stdout: str) -> dict[int, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


def test_smoke_run_prints_a_row_per_process_count_with_converging_nmse():
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sae_scaling", "--smoke", "--processes", "1,2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = _rows(done.stdout)
    assert sorted(rows) == [1, 2], done.stdout
    for processes, (_, threads, seconds, vectors_per_s, speedup, nmse) in rows.items():
        assert int(threads) >= 1
        assert float(seconds) > 0
        assert float(vectors_per_s.replace(",", "")) > 0
        assert float(speedup) > 0
        values = [float(v) for v in nmse.split(",")]
        assert values and all(math.isfinite(v) and v < 1.5 for v in values), (processes, nmse)
    assert float(rows[1][4]) == 1.0
