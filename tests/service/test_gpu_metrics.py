"""GPU gauges on /metrics (service/gpu_metrics.py), with a stand-in for NVML and PyTorch's counters."""

from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.gpu_metrics import GpuMonitor


class FakeNvml:
    """The part of pynvml the monitor uses (its camel-case names); ``fail`` names calls that raise."""

    def __init__(self, utilisation: int = 37, used: int = 5_000, total: int = 80_000, fail: tuple[str, ...] = ()):
        self.utilisation, self.used, self.total, self.fail = utilisation, used, total, fail
        self.count = 1
        self.calls: list[tuple[str, object]] = []

    def _call(self, name: str, arg: object = None) -> None:
        self.calls.append((name, arg))
        if name in self.fail:
            raise RuntimeError(f"{name} failed")

    def nvmlInit(self) -> None:
        self._call("init")

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self._call("by_uuid", uuid)
        return f"handle:{uuid}"

    def nvmlDeviceGetCount(self) -> int:
        self._call("count")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._call("by_index", index)
        return f"handle:{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str):
        self._call("utilisation", handle)
        return types.SimpleNamespace(gpu=self.utilisation, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str):
        self._call("memory", handle)
        return types.SimpleNamespace(used=self.used, total=self.total, free=self.total - self.used)


class Gauges:
    """The gauges of service.metrics.Metrics that the monitor sets, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        names = {
            "gpu_memory": "fact_gpu_memory_bytes",
            "gpu_memory_reserved": "fact_gpu_memory_reserved_bytes",
            "gpu_memory_peak": "fact_gpu_memory_peak_bytes",
            "gpu_utilisation": "fact_gpu_utilisation_ratio",
            "gpu_device_memory_used": "fact_gpu_device_memory_used_bytes",
            "gpu_device_memory_total": "fact_gpu_device_memory_total_bytes",
        }
        for attribute, name in names.items():
            setattr(self, attribute, Gauge(name, name, ["device"], registry=self.registry))

    def samples(self) -> dict[tuple[str, str], float]:
        text = generate_latest(self.registry).decode()
        return {
            (s.name, s.labels["device"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def memory() -> tuple[int, int, int]:
    return 1_000, 4_096, 2_000


def test_publish_sets_torch_and_nvml_gauges_of_the_gpu_found_by_uuid():
    nvml = FakeNvml()
    monitor = GpuMonitor("cuda:1", memory=memory, nvml=nvml, uuid="GPU-abc")
    gauges = Gauges()
    reading = monitor.publish(gauges)
    assert ("by_uuid", "GPU-abc") in nvml.calls and ("utilisation", "handle:GPU-abc") in nvml.calls
    assert reading.utilisation == pytest.approx(0.37)
    assert gauges.samples() == {
        ("fact_gpu_memory_bytes", "cuda:1"): 1_000,
        ("fact_gpu_memory_reserved_bytes", "cuda:1"): 4_096,
        ("fact_gpu_memory_peak_bytes", "cuda:1"): 2_000,
        ("fact_gpu_utilisation_ratio", "cuda:1"): pytest.approx(0.37),
        ("fact_gpu_device_memory_used_bytes", "cuda:1"): 5_000,
        ("fact_gpu_device_memory_total_bytes", "cuda:1"): 80_000,
    }


def test_a_uuid_nvml_does_not_know_falls_back_to_the_only_gpu_only():
    nvml = FakeNvml(fail=("by_uuid",))
    assert GpuMonitor("cuda:0", memory=memory, nvml=nvml, uuid="GPU-x").read().utilisation == pytest.approx(0.37)
    assert ("by_index", 0) in nvml.calls
    several = FakeNvml(fail=("by_uuid",))
    several.count = 2
    monitor = GpuMonitor("cuda:0", memory=memory, nvml=several, uuid="GPU-x")
    assert not monitor.has_nvml and monitor.read().utilisation is None  # which of two: unknown, so none


def test_without_a_uuid_nvml_device_zero_is_read():
    nvml = FakeNvml()
    GpuMonitor("cuda:0", memory=memory, nvml=nvml).read()
    assert ("by_index", 0) in nvml.calls


def test_without_nvml_only_pytorchs_figures_are_published():
    gauges = Gauges()
    reading = GpuMonitor("cuda:0", memory=memory).publish(gauges)
    assert reading.utilisation is None and reading.device_used is None
    assert set(gauges.samples()) == {
        ("fact_gpu_memory_bytes", "cuda:0"),
        ("fact_gpu_memory_reserved_bytes", "cuda:0"),
        ("fact_gpu_memory_peak_bytes", "cuda:0"),
    }


def test_an_nvml_that_cannot_start_leaves_pytorchs_figures(caplog):
    monitor = GpuMonitor("cuda:0", memory=memory, nvml=FakeNvml(fail=("init",)))
    assert not monitor.has_nvml
    assert monitor.read().allocated == 1_000 and "NVML unavailable" in caplog.text


def test_a_failing_nvml_query_is_reported_once_and_not_retried(caplog):
    nvml = FakeNvml(fail=("utilisation",))
    monitor = GpuMonitor("cuda:0", memory=memory, nvml=nvml)
    first, second = monitor.read(), monitor.read()
    assert first.utilisation is None and second.utilisation is None and second.reserved == 4_096
    assert [name for name, _ in nvml.calls].count("utilisation") == 1
    assert caplog.text.count("NVML query failed") == 1


def test_the_service_metrics_have_every_gauge_the_monitor_sets():
    from service.metrics import METRICS

    GpuMonitor("cuda:7", memory=memory, nvml=FakeNvml()).publish(METRICS)  # raises on a missing gauge


def test_nvml_is_asked_at_most_once_per_interval():
    """The service publishes after every response: NVML's figures are reused within the interval."""
    nvml = FakeNvml()
    monitor = GpuMonitor("cuda:0", memory=memory, nvml=nvml, nvml_interval_s=3600)
    first, second = monitor.read(), monitor.read()
    assert first == second and [name for name, _ in nvml.calls].count("utilisation") == 1
    always = FakeNvml()
    fresh = GpuMonitor("cuda:0", memory=memory, nvml=always, nvml_interval_s=0)
    fresh.read(), fresh.read()
    assert [name for name, _ in always.calls].count("utilisation") == 2
