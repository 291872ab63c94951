"""A worker's GPU on ``/metrics``: PyTorch's memory counters, and utilisation and memory from NVML.

PyTorch says what this worker holds (allocated by tensors, reserved by its caching allocator,
the peak since start). NVML, the NVIDIA driver's management library, says what the whole
GPU does: its utilisation (the share of the last sample period in which a kernel ran) and the
memory used by every process on it. NVML is read through ``pynvml`` (the ``nvidia-ml-py``
package, which BentoML depends on); without it, or without a driver, only PyTorch's figures
are published.

NVML numbers GPUs physically, not by ``CUDA_VISIBLE_DEVICES`` (which ``service/placement.py``
narrows per worker), so the GPU is found by the UUID PyTorch reports for ``cuda:0``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["GpuMonitor", "GpuReading", "torch_memory"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    """One reading, bytes unless said otherwise; None where the source is unavailable.

    Attributes:
        allocated: bytes this worker's tensors occupy.
        reserved: bytes this worker's caching allocator holds (≥ allocated).
        peak: the largest ``allocated`` since the worker started.
        utilisation: share in [0, 1] of the driver's last sample period in which a kernel ran (NVML).
        device_used, device_total: memory of the whole GPU, all processes (NVML).
    """

    allocated: int
    reserved: int
    peak: int
    utilisation: float | None = None
    device_used: int | None = None
    device_total: int | None = None


def torch_memory() -> tuple[int, int, int]:
    """``(allocated, reserved, peak)`` bytes of the current CUDA device in this process."""
    import torch

    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), torch.cuda.max_memory_allocated()


def _torch_uuid() -> str | None:
    """NVML's name (``GPU-…``) of PyTorch's current CUDA device, or None when PyTorch does not say."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class GpuMonitor:
    """Reads a worker's GPU and publishes it as gauges (:meth:`publish`).

    Args:
        label: the ``device`` label of the gauges (e.g. ``cuda:0``, or the pinned GPU).
        memory: ``() → (allocated, reserved, peak)`` bytes (default :func:`torch_memory`).
        nvml: the ``pynvml`` module (or a stand-in with its functions), None for no NVML.
        uuid: the GPU's NVML UUID; None takes NVML's device 0.
        nvml_interval_s: NVML is asked at most this often (the service publishes after every
            response); in between, a reading repeats NVML's last figures.
    """

    def __init__(
        self,
        label: str,
        memory: Callable[[], tuple[int, int, int]] = torch_memory,
        nvml: ModuleType | Any | None = None,
        uuid: str | None = None,
        nvml_interval_s: float = 1.0,
    ) -> None:
        self.label = label
        self._nvml_interval_s = nvml_interval_s
        self._nvml_last: tuple[float, tuple[float | None, int | None, int | None]] | None = None
        self._memory = memory
        self._nvml = nvml
        self._handle = None
        if nvml is not None:
            try:
                nvml.nvmlInit()
                self._handle = self._find(nvml, uuid)
            except Exception as err:  # no driver, no such GPU: PyTorch's figures still go out
                log.warning("NVML unavailable (%s: %s): GPU utilisation is not reported", type(err).__name__, err)
                self._nvml = None

    @staticmethod
    def _find(nvml: Any, uuid: str | None) -> Any:
        """NVML's handle of the GPU ``uuid``; device 0 without a UUID, or when the driver has one GPU only
        and does not know the UUID as PyTorch wrote it."""
        if not uuid:
            return nvml.nvmlDeviceGetHandleByIndex(0)
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:
            if nvml.nvmlDeviceGetCount() == 1:
                return nvml.nvmlDeviceGetHandleByIndex(0)
            raise

    @classmethod
    def for_current_device(cls, label: str) -> GpuMonitor:
        """The monitor of PyTorch's current CUDA device, with NVML when ``pynvml`` can be imported."""
        try:
            import pynvml
        except ImportError:
            log.info("pynvml (nvidia-ml-py) is not installed: GPU utilisation is not reported")
            return cls(label)
        return cls(label, nvml=pynvml, uuid=_torch_uuid())

    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None and self._handle is not None

    def read(self) -> GpuReading:
        """The current figures (NVML's as None when it is unavailable or a query fails)."""
        allocated, reserved, peak = self._memory()
        return GpuReading(int(allocated), int(reserved), int(peak), *self._device_figures())

    def _device_figures(self) -> tuple[float | None, int | None, int | None]:
        """NVML's ``(utilisation, used, total)``, asked at most every ``nvml_interval_s``; Nones without NVML."""
        if not self.has_nvml:
            return None, None, None
        now = time.monotonic()
        if self._nvml_last is not None and now - self._nvml_last[0] < self._nvml_interval_s:
            return self._nvml_last[1]
        try:
            utilisation = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as err:  # a GPU that went away: say so once, keep serving
            log.warning("NVML query failed (%s: %s); GPU utilisation no longer reported", type(err).__name__, err)
            self._nvml = None
            return None, None, None
        self._nvml_last = (now, (utilisation, int(info.used), int(info.total)))
        return self._nvml_last[1]

    def publish(self, metrics: Any) -> GpuReading:
        """Read and set the gauges of ``metrics`` (:class:`service.metrics.Metrics`); returns the reading."""
        reading = self.read()
        metrics.gpu_memory.labels(device=self.label).set(reading.allocated)
        metrics.gpu_memory_reserved.labels(device=self.label).set(reading.reserved)
        metrics.gpu_memory_peak.labels(device=self.label).set(reading.peak)
        if reading.utilisation is not None:
            metrics.gpu_utilisation.labels(device=self.label).set(reading.utilisation)
            metrics.gpu_device_memory_used.labels(device=self.label).set(reading.device_used)
            metrics.gpu_device_memory_total.labels(device=self.label).set(reading.device_total)
        return reading
