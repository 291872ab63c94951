"""Launch a module alone or in several `torchrun` workers on loopback (gloo), for the multi-process tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from fact_model.options import TORCHRUN_VARIABLES

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], processes: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` alone (``processes == 1``) or under ``torchrun --nproc-per-node processes``.

    Every worker gets one thread (torchrun's own default), so both runs compute alike; nothing but
    loopback is used. Returns the finished process (the caller checks its status).
    """
    env = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["GLOO_SOCKET_IFNAME"] = "lo"
    if processes == 1:
        argv = [sys.executable, "-m", module, *args]
    else:
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0",
            "-m", module, *args,
        ]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run(module: str, args: list[str], processes: int, timeout: float = 240) -> float:
    """:func:`launch`, asserting success; returns the seconds it took."""
    start = time.perf_counter()
    done = launch(module, args, processes, timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return time.perf_counter() - start
