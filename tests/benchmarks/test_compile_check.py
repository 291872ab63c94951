"""``python -m benchmarks.compile_check``: every kernel compiles for an H100 (sm_90) on this GPU-less machine.

The interpreter tests check what the kernels compute; only the compiler sees whether they
lower for the GPU and whether a tile configuration's buffers fit its shared memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = ("_sumsq_kernel", "_fused_conv_body", "_postop_kernel", "_postop_backward_kernel", "_scale_grad_kernel",
           "_encode_topk_kernel", "_select_topk_kernel", "_gather_sum_kernel", "_gather_dot_kernel",
           "_scatter_rows_kernel")  # fmt: skip


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_check", "--quick", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _ptxas_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


pytestmark = [
    pytest.mark.skipif(not _ptxas_available(), reason="Triton's bundled ptxas is missing"),
    pytest.mark.slow,  # compiles every kernel with ptxas
]


def test_every_kernel_compiles_for_sm90_within_shared_memory():
    result = _run()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for kernel in KERNELS:
        assert kernel in result.stdout
    assert "variants compile" in result.stdout


def test_a_configuration_over_the_shared_memory_limit_fails_the_check():
    result = _run("--shared-limit", "16384")  # 16 KiB: the fused conv's pipelined tiles need more
    assert result.returncode == 1
    assert "bytes of shared memory, the card has 16384" in result.stdout
