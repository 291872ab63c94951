"""Prometheus metrics of the explanation service (names prefixed ``fact_``).

Created with ``bentoml.metrics`` so that they are aggregated across worker processes
(BentoML's multiprocess collector) and exported on the service's ``/metrics``.
"""

from __future__ import annotations

import bentoml

__all__ = ["METRICS", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_RESIDUAL_BUCKETS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


class Metrics:
    """All custom metrics; instantiate once per worker."""

    def __init__(self) -> None:
        self.stage_seconds = bentoml.metrics.Histogram(
            name="fact_explain_stage_seconds",
            documentation="Explain latency by stage (preprocess, forward, backward, render, encode)",
            labelnames=["endpoint", "stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = bentoml.metrics.Histogram(
            name="fact_batch_size",
            documentation="Images per model call",
            labelnames=["endpoint"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.residual = bentoml.metrics.Histogram(
            name="fact_completeness_relative_residual",
            documentation="|Σ contributions − (logit − bias)| / Σ|contributions| per explanation",
            buckets=_RESIDUAL_BUCKETS,
        )
        self.active_concepts = bentoml.metrics.Histogram(
            name="fact_active_concepts",
            documentation="Concepts with any activation per image",
            labelnames=["layer"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.rejected = bentoml.metrics.Counter(
            name="fact_rejected_requests",
            documentation="Requests refused before or during model work, by reason",
            labelnames=["endpoint", "reason"],
        )
        self.response_bytes = bentoml.metrics.Histogram(
            name="fact_response_bytes",
            documentation="Response body size",
            labelnames=["endpoint"],
            buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304),
        )
        self.model_info = bentoml.metrics.Gauge(
            name="fact_model_info",
            documentation="The served model (value 1)",
            labelnames=["name", "version", "device", "weights_sha256"],
            multiprocess_mode="max",
        )
        self.http_requests = bentoml.metrics.Counter(
            name="fact_http_requests",
            documentation="Answered HTTP requests by route template (unknown paths: route=other), method and status",
            labelnames=["route", "method", "status"],
        )
        self.http_seconds = bentoml.metrics.Histogram(
            name="fact_http_request_duration_seconds",
            documentation="Time from request to response by route template",
            labelnames=["route"],
            buckets=_LATENCY_BUCKETS,
        )
        # GPU gauges (service/gpu_metrics.py): per worker, summed over the live workers of a device
        # label; the NVML ones describe the whole GPU, so workers sharing it report it once (max).
        self.gpu_memory = _gpu_gauge("memory_bytes", "CUDA memory allocated by the worker's tensors", "livesum")
        self.gpu_memory_reserved = _gpu_gauge(
            "memory_reserved_bytes", "CUDA memory held by the worker's caching allocator", "livesum"
        )
        self.gpu_memory_peak = _gpu_gauge(
            "memory_peak_bytes", "Largest CUDA memory allocated by the worker since it started", "livesum"
        )
        self.gpu_utilisation = _gpu_gauge(
            "utilisation_ratio", "Share of the driver's last sample period in which a GPU kernel ran (NVML)", "max"
        )
        self.gpu_device_memory_used = _gpu_gauge(
            "device_memory_used_bytes", "Memory used on the GPU by all processes (NVML)", "max"
        )
        self.gpu_device_memory_total = _gpu_gauge("device_memory_total_bytes", "Memory of the GPU (NVML)", "max")


def _gpu_gauge(name: str, documentation: str, multiprocess_mode: str) -> bentoml.metrics.Gauge:
    """``fact_gpu_<name>``, labelled by ``device``, aggregated over workers by ``multiprocess_mode``."""
    return bentoml.metrics.Gauge(
        name=f"fact_gpu_{name}", documentation=documentation, labelnames=["device"], multiprocess_mode=multiprocess_mode
    )


METRICS = Metrics()
"""The worker's metrics (prometheus registries are per process; BentoML aggregates them)."""
