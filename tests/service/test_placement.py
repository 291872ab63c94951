"""``service.placement``: which GPU each worker uses, from its BentoML worker index and the visible GPUs.

No GPU needed: the GPU count is injected, and the environment is a plain dict.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from service.placement import PER_GPU, gpu_workers, pin_worker_gpu, visible_gpus, worker_gpu
from service.settings import Settings


def _none() -> int:
    raise AssertionError("CUDA_VISIBLE_DEVICES is set: the driver must not be asked")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0,1,2,3", ("0", "1", "2", "3")),
        (" 2 , 3 ", ("2", "3")),
        ("GPU-8f2e,GPU-77aa", ("GPU-8f2e", "GPU-77aa")),
        ("MIG-0c1d", ("MIG-0c1d",)),
        ("", ()),
        ("-1", ()),
        ("0,-1,1", ("0",)),  # CUDA stops at the first invalid entry
        ("1,,2", ("1",)),
    ],
)
def test_visible_gpus_parses_cuda_visible_devices(value, expected):
    assert visible_gpus(value, _none) == expected


def test_visible_gpus_asks_the_driver_only_when_unset():
    assert visible_gpus(None, lambda: 3) == ("0", "1", "2")
    assert visible_gpus(None, lambda: 0) == ()


@pytest.mark.parametrize(
    ("index", "gpus", "expected"),
    [
        (1, ("0", "1"), "0"),
        (2, ("0", "1"), "1"),
        (3, ("0", "1"), "0"),  # more workers than GPUs (or circus's spare indices 3…4): in turn
        (4, ("0", "1"), "1"),
        (2, ("4", "6", "7"), "6"),  # the entries themselves, not their positions
        (1, ("GPU-a", "GPU-b"), "GPU-a"),
        (None, ("0", "1"), None),  # not a worker: bentoml build, the arbiter, a test process
        (1, ("3",), None),  # one GPU: nothing to choose, CUDA_VISIBLE_DEVICES stays as it is
        (2, (), None),
    ],
)
def test_worker_gpu(index, gpus, expected):
    assert worker_gpu(index, gpus) == expected


def test_every_gpu_gets_exactly_one_worker_per_gpu():
    gpus = tuple(str(i) for i in range(8))
    assert sorted(worker_gpu(i, gpus) for i in range(1, 9)) == list(gpus)


def test_worker_gpu_refuses_an_index_below_one():
    with pytest.raises(ValueError, match="start at 1, got 0"):
        worker_gpu(0, ("0", "1"))


def test_pin_narrows_the_environment_to_the_workers_gpu():
    environ = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert pin_worker_gpu(2, "auto", environ, _none) == "3"
    assert environ == {"CUDA_VISIBLE_DEVICES": "3"}

    environ = {}
    assert pin_worker_gpu(3, "cuda", environ, lambda: 4) == "2"
    assert environ == {"CUDA_VISIBLE_DEVICES": "2"}


@pytest.mark.parametrize(
    ("index", "device", "environ", "count"),
    [
        (2, "cpu", {"CUDA_VISIBLE_DEVICES": "0,1"}, 2),  # FACT_DEVICE=cpu never pins
        (None, "cuda", {}, 2),
        (1, "auto", {}, 1),
        (1, "auto", {}, 0),
    ],
)
def test_pin_leaves_the_environment_alone(index, device, environ, count):
    before = dict(environ)
    assert pin_worker_gpu(index, device, environ, lambda: count) is None
    assert environ == before


def test_gpu_workers_counts_visible_gpus_and_is_at_least_one():
    assert gpu_workers({"CUDA_VISIBLE_DEVICES": "0,1,2"}, _none) == 3
    assert gpu_workers({}, lambda: 2) == 2
    assert gpu_workers({}, lambda: 0) == 1
    assert gpu_workers({"CUDA_VISIBLE_DEVICES": ""}, _none) == 1


def test_settings_per_gpu_workers(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FACT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FACT_WORKERS", PER_GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert Settings.from_env().workers == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Settings.from_env().workers == 1
    monkeypatch.setenv("FACT_WORKERS", "3")
    assert Settings.from_env().workers == 3


@pytest.mark.slow
def test_a_real_server_pins_each_worker_from_its_index(tmp_path):
    """Two "GPUs" on a CPU box: ``per-gpu`` starts two workers and each narrows CUDA_VISIBLE_DEVICES to its own.

    This checks what the unit tests assume of BentoML: the worker index is set before the service
    module is imported, and the arbiter (index None) counts the GPUs.
    """
    from tests._support.server import running_server

    env = {"FACT_WORKERS": PER_GPU, "FACT_DEVICE": "auto", "CUDA_VISIBLE_DEVICES": "0,1"}
    with running_server(tmp_path, env=env) as url:
        deadline = time.monotonic() + 60  # /readyz is 200 once *a* worker is ready: wait for both start-up lines
        while time.monotonic() < deadline:
            log = "".join(path.read_text() for path in tmp_path.glob("server-*.log"))
            pinned = sorted(re.findall(r"\[entry_service:fact:(\d)\] serving .* \(CUDA_VISIBLE_DEVICES=(\d)\)", log))
            if len(pinned) == 2:
                break
            time.sleep(0.5)
        assert url
    assert pinned == [("1", "0"), ("2", "1")]
