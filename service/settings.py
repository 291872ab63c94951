"""Service settings from environment variables (documented in the README).

=============================  ==========================  ==========================================
variable                       default                     meaning
=============================  ==========================  ==========================================
``FACT_MODEL_TAG``             ``fact-default:latest``     model in the BentoML model store
``FACT_ARTIFACT``              (unset)                     artifact directory to serve instead
``FACT_DEVICE``                ``auto``                    ``auto`` (CUDA when present), ``cpu``, ``cuda``
``FACT_DTYPE``                 ``float32``                 model precision: ``float32`` (exact), ``tf32`` (TF32
                                                           products on CUDA), ``bfloat16`` (``service/compute.py``)
``FACT_WORKERS``               ``1``                       worker processes; ``per-gpu``: one per visible GPU,
                                                           each pinned to its own (``service/placement.py``)
``FACT_MAX_REQUEST_BYTES``     ``10485760`` (10 MiB)       larger request bodies get HTTP 413
``FACT_MAX_PIXELS``            ``25000000``                larger decoded images are refused (bombs)
``FACT_MAX_TOP_K``             ``20``                      upper bound of ``top_k``
``FACT_MAX_BATCH_ITEMS``       ``16``                      upper bound of ``/explain_batch`` items
``FACT_REQUEST_TIMEOUT``       ``30``                      seconds before a request gets HTTP 504
``FACT_BODY_TIMEOUT``          ``5``                       seconds without body data before HTTP 408
``FACT_QUEUE_BUDGET``          ``2``                       seconds of queued model work per worker above which
                                                           ``/explain*`` requests get HTTP 503 at once
``FACT_DECODE_CONCURRENCY``    ``2``                       images decoded at once per worker (off the event loop)
``FACT_CORS_ORIGINS``          (unset: CORS off)           comma-separated origins allowed by CORS (``*`` for any)
``FACT_MAX_CONCURRENCY``       ``64``                      requests in flight per worker; more get HTTP 429 at once
``FACT_PREDICT_MAX_BATCH``     ``32``                      adaptive batching: largest ``/predict`` batch
``FACT_RUNTIME``               ``pytorch``                 ``/predict`` runtime: ``pytorch`` or ``onnx``
``FACT_TORCH_THREADS``         (torch default)             intra-op threads of the model thread
``FACT_PREDICT_MAX_LATENCY``   ``500``                     adaptive batching: latency budget (ms); over it → 503
``FACT_ADMIN_TOKEN``           (unset: label writes off)   bearer token that concept-label writes require
``FACT_LABELS_PATH``           (next to the model)         concept-label file (default
                                                           ``<artifact>/concept_labels.json``)
=============================  ==========================  ==========================================

The library's own options (``FACT_KERNELS``, ``FACT_BCOS_CONV_PATH``, ``FACT_CONCEPT_ENCODE_PATH``,
``FACT_EXPLAIN_VJP``) are read by :meth:`fact_model.options.Options.from_environ` into
``Settings.options``, which the engine puts in force around every model call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from fact_model.options import Options
from service.placement import PER_GPU, gpu_workers

__all__ = ["DTYPES", "MIN_ADMIN_TOKEN", "SETTINGS", "Settings", "check_dtype"]

DTYPES = ("float32", "tf32", "bfloat16")
"""``FACT_DTYPE`` values (what each means: :mod:`service.compute`)."""


def check_dtype(dtype: str) -> str:
    """``dtype`` if it is a ``FACT_DTYPE`` value, else a ValueError naming the choices."""
    if dtype not in DTYPES:
        raise ValueError(f"FACT_DTYPE must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


MIN_ADMIN_TOKEN = 16
"""Shortest ``FACT_ADMIN_TOKEN`` accepted (characters): a guessable token is refused at start-up."""


def _positive(name: str, default: float, kind: type[int] | type[float]) -> float:
    """A positive number from the environment variable ``name`` (``default`` when unset or empty)."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"environment variable {name} must be {what}, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"environment variable {name} must be a finite number, got {raw!r}")
    if not value > 0:
        raise ValueError(f"environment variable {name} must be {'≥ 1' if kind is int else '> 0'}, got {value}")
    return value


def _int(name: str, default: int) -> int:
    return int(_positive(name, default, int))


def _float(name: str, default: float) -> float:
    return float(_positive(name, default, float))


def _workers() -> int:
    """``FACT_WORKERS``: a positive integer, or ``per-gpu`` (one worker per visible GPU)."""
    if os.environ.get("FACT_WORKERS") == PER_GPU:
        return gpu_workers(os.environ)
    try:
        return _int("FACT_WORKERS", 1)
    except ValueError as err:
        raise ValueError(f"{err} (or {PER_GPU!r}: one worker per visible GPU)") from None


@dataclass(frozen=True)
class Settings:
    model_tag: str
    artifact: str | None
    device: str
    workers: int
    max_request_bytes: int
    max_pixels: int | None
    max_top_k: int
    max_batch_items: int
    request_timeout: int
    max_concurrency: int
    predict_max_batch: int
    predict_max_latency_ms: int
    torch_threads: int | None
    runtime: str
    body_timeout_s: float = 5.0
    queue_budget_s: float = 2.0
    decode_concurrency: int = 2
    cors_origins: tuple[str, ...] = ()
    options: Options = field(default_factory=Options)
    admin_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log line
    labels_path: str | None = None
    dtype: str = "float32"

    @classmethod
    def from_env(cls) -> Settings:
        device = os.environ.get("FACT_DEVICE") or "auto"  # unset or empty: the default, like every variable
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"FACT_DEVICE must be auto, cpu or cuda, got {device!r}")
        admin_token = os.environ.get("FACT_ADMIN_TOKEN") or None
        if admin_token is not None and (len(admin_token) < MIN_ADMIN_TOKEN or not admin_token.isprintable()):
            raise ValueError(
                f"FACT_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN} printable characters (e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`); unset it to disable label writes"
            )
        dtype = check_dtype(os.environ.get("FACT_DTYPE") or "float32")
        runtime = os.environ.get("FACT_RUNTIME") or "pytorch"
        if runtime not in ("pytorch", "onnx"):
            raise ValueError(f"FACT_RUNTIME must be pytorch or onnx, got {runtime!r}")
        return cls(
            model_tag=os.environ.get("FACT_MODEL_TAG", "fact-default:latest"),
            artifact=os.environ.get("FACT_ARTIFACT") or None,
            device=device,
            workers=_workers(),
            max_request_bytes=_int("FACT_MAX_REQUEST_BYTES", 10 * 1024 * 1024),
            max_pixels=_int("FACT_MAX_PIXELS", 1) if os.environ.get("FACT_MAX_PIXELS") else None,
            max_top_k=_int("FACT_MAX_TOP_K", 20),
            max_batch_items=_int("FACT_MAX_BATCH_ITEMS", 16),
            request_timeout=_int("FACT_REQUEST_TIMEOUT", 30),
            max_concurrency=_int("FACT_MAX_CONCURRENCY", 64),
            predict_max_batch=_int("FACT_PREDICT_MAX_BATCH", 32),
            predict_max_latency_ms=_int("FACT_PREDICT_MAX_LATENCY", 500),
            torch_threads=_int("FACT_TORCH_THREADS", 1) if os.environ.get("FACT_TORCH_THREADS") else None,
            runtime=runtime,
            body_timeout_s=_float("FACT_BODY_TIMEOUT", 5.0),
            queue_budget_s=_float("FACT_QUEUE_BUDGET", 2.0),
            decode_concurrency=_int("FACT_DECODE_CONCURRENCY", 2),
            cors_origins=tuple(o.strip() for o in os.environ.get("FACT_CORS_ORIGINS", "").split(",") if o.strip()),
            options=Options.from_environ(),
            admin_token=admin_token,
            labels_path=os.environ.get("FACT_LABELS_PATH") or None,
            dtype=dtype,
        )

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("FACT_DEVICE=cuda but no CUDA device is available")
        return self.device


SETTINGS = Settings.from_env()
"""Read once at import, in every worker (the environment is the configuration)."""
