"""One smoke run of the GPU endpoint script, shared by its test and the kernel benchmark's (CI's time)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SmokeRun:
    """``python -m benchmarks.gpu_endpoint --smoke``: its process result and its output folder."""

    result: subprocess.CompletedProcess
    out: Path


@pytest.fixture(scope="session")
def endpoint_smoke(tmp_path_factory) -> SmokeRun:
    """The whole GPU script on the CPU: ``out/gpu_endpoint.json`` and the kernel benchmark's ``out/kernels/``."""
    out = tmp_path_factory.mktemp("gpu_endpoint")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    env.pop("FACT_KERNELS", None)
    env.pop("OUT", None)
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_endpoint", "--smoke", "--out", str(out), "--check-workers", "1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return SmokeRun(result, out)
