"""GPU placement of the service's workers: one worker per GPU, each with its own copy of the model.

``FACT_WORKERS=per-gpu`` starts one worker per visible GPU (:func:`gpu_workers`), and every worker
narrows ``CUDA_VISIBLE_DEVICES`` to one GPU chosen from its worker index (:func:`worker_gpu`)
before CUDA starts (:func:`pin_worker_gpu`). Inside a worker that GPU is then ``cuda`` /
``cuda:0`` for PyTorch, ONNX Runtime and the Triton kernels alike, so nothing downstream needs a
device index.

Why we pin ourselves (BentoML 1.4.40, read in its source): ``ResourceAllocator.get_worker_env``
(``_bentoml_impl/server/allocator.py``) gives *every* worker of a service the same
``CUDA_VISIBLE_DEVICES`` — all the GPUs of ``resources={"gpu": N}`` — and sets nothing when
``CUDA_VISIBLE_DEVICES`` is already in the environment; the per-worker ``--worker-env`` list of
``_bentoml_impl/worker/service.py`` is never filled by ``bentoml serve``. Left alone, N workers
would all load onto the first GPU. What BentoML does give each worker is
``bentoml.server_context.worker_index``, circus's ``$(CIRCUS.WID)``, set before the service
module is imported: 1-based, and a restarted worker takes the lowest free index (so it gets its
predecessor's GPU back). Circus draws indices from ``1 … 2 × workers``, hence the modulo.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

__all__ = ["PER_GPU", "gpu_workers", "pin_worker_gpu", "system_gpu_count", "visible_gpus", "worker_gpu"]

PER_GPU = "per-gpu"
"""The ``FACT_WORKERS`` value that asks for one worker per visible GPU."""


def visible_gpus(cuda_visible_devices: str | None, system_count: Callable[[], int]) -> tuple[str, ...]:
    """The GPUs a process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or ``GPU-…``/``MIG-…`` UUIDs).

    ``cuda_visible_devices``: the variable's value, None when unset (then every GPU the driver
    reports, ``system_count()``). Like CUDA, an empty value or a ``-1`` entry ends the list.
    """
    if cuda_visible_devices is None:
        return tuple(str(i) for i in range(system_count()))
    gpus: list[str] = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        gpus.append(entry)
    return tuple(gpus)


def worker_gpu(worker_index: int | None, gpus: Sequence[str]) -> str | None:
    """The GPU (a ``CUDA_VISIBLE_DEVICES`` entry) that worker ``worker_index`` uses, or None to leave it be.

    None outside a worker (``worker_index`` None: ``bentoml build``, the serving arbiter, tests) and
    with fewer than two GPUs (nothing to choose). Workers take the GPUs in turn, so more workers
    than GPUs share them evenly.
    """
    if worker_index is None or len(gpus) < 2:
        return None
    if worker_index < 1:
        raise ValueError(f"BentoML worker indices start at 1, got {worker_index}")
    return gpus[(worker_index - 1) % len(gpus)]


def system_gpu_count() -> int:
    """GPUs the NVIDIA driver reports (NVML, through BentoML's own resource query; 0 without a driver).

    NVML does not start CUDA, so this is safe to call before a worker picks its GPU (a
    ``torch.cuda`` call would start it and fix the visible devices for the process).
    """
    from bentoml._internal.resource import NvidiaGpuResource

    return len(NvidiaGpuResource.from_system())


def gpu_workers(environ: MutableMapping[str, str], system_count: Callable[[], int] = system_gpu_count) -> int:
    """How many workers ``FACT_WORKERS=per-gpu`` starts: one per visible GPU, 1 without a GPU."""
    return max(1, len(visible_gpus(environ.get("CUDA_VISIBLE_DEVICES"), system_count)))


def pin_worker_gpu(
    worker_index: int | None,
    device: str,
    environ: MutableMapping[str, str],
    system_count: Callable[[], int] = system_gpu_count,
) -> str | None:
    """Narrow ``environ["CUDA_VISIBLE_DEVICES"]`` to this worker's GPU; returns it (None: left unchanged).

    Call before anything starts CUDA in the process. ``device``: the ``FACT_DEVICE`` setting
    (``cpu`` never pins).
    """
    if device == "cpu":
        return None
    gpu = worker_gpu(worker_index, visible_gpus(environ.get("CUDA_VISIBLE_DEVICES"), system_count))
    if gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
