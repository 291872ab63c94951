"""Where and in what precision a worker's model work runs, and how tensors cross to and from it.

One :class:`Compute` per worker, built on the model thread (the thread that loads the model
and then runs every model call, ``service/service.py``). It holds:

* the **device** and the **precision** (``FACT_DTYPE``): ``float32`` (exact float32 arithmetic,
  TF32 off everywhere: the explanations' completeness residual stays at float32 rounding),
  ``tf32`` (float32 weights, TensorFloat-32 matrix products and convolutions on CUDA), or
  ``bfloat16`` (weights and activations in bfloat16; the residual is still computed in float32
  and reported per response, so the cost in faithfulness is visible);
* on CUDA, the model thread's own **stream**: every model call of the engine runs on it
  (:meth:`session`), so the PyTorch default stream stays free and one response's device work
  is ordered on one queue;
* the **copies**: a preprocessed batch goes up pinned and non-blocking (:meth:`to_device`), and
  everything one response needs comes back in one transfer (:meth:`to_host`,
  :func:`fact_model.host_transfer.to_host`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import Tensor

from fact_model import host_transfer
from service.settings import check_dtype

__all__ = ["Compute", "precision_flags"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def precision_flags(dtype: str) -> dict[str, object]:
    """The process-wide PyTorch switches that ``FACT_DTYPE=dtype`` sets on CUDA.

    ``allow_tf32`` of cuBLAS and cuDNN, and ``float32_matmul_precision`` (which the Triton
    concept encode also follows): TF32 only for ``tf32``. ``bfloat16`` computes in bfloat16
    already, so its float32 leftovers (losses, residuals) stay exact.
    """
    tf32 = check_dtype(dtype) == "tf32"
    return {
        "cuda_matmul_allow_tf32": tf32,
        "cudnn_allow_tf32": tf32,
        "float32_matmul_precision": "high" if tf32 else "highest",
    }


class Compute:
    """A worker's device, precision, CUDA stream and host↔device copies (see the module docstring).

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``Settings.resolve_device``).
        dtype: one of :data:`DTYPES`.

    Build it on the thread that will run the model: that thread owns the stream, and model
    work started from another thread is refused (:meth:`session`).
    """

    def __init__(self, device: str, dtype: str = "float32") -> None:
        flags = precision_flags(dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.owner = threading.get_ident()
        self.stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = flags["cuda_matmul_allow_tf32"]
            torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
            torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
            self.stream = torch.cuda.Stream(self.device)
        elif dtype == "tf32":
            log.warning("FACT_DTYPE=tf32 has no effect on the CPU: the model computes in float32")

    @property
    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Model work in force: on CUDA, the worker's stream, on the owning thread only.

        Raises:
            RuntimeError: on CUDA, called from another thread than the one that built this object
                (a wiring bug: every model call goes through the service's single model thread).
                On the CPU nothing is bound to a thread, and tests drive the engine from any.
        """
        if self.stream is None:
            yield
            return
        if threading.get_ident() != self.owner:
            raise RuntimeError(
                f"model work must run on the thread that owns the model's CUDA stream ({self.owner}), not on "
                f"{threading.current_thread().name}: submit it to the model thread"
            )
        with torch.cuda.stream(self.stream):
            yield

    def to_device(self, batch: Tensor) -> Tensor:
        """A preprocessed CPU batch ``(N, 3, S, S)`` float32 in [0, 1] → the model's device and dtype.

        On CUDA the batch is pinned and copied without blocking (the copy overlaps whatever the
        stream still runs); the cast to bfloat16, if any, happens on the device.
        """
        if self.uses_cuda:
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch.to(self.model_dtype)

    def to_host(self, tree: T) -> T:
        """Every tensor of ``tree`` on the CPU, in one device→host copy (:func:`fact_model.host_transfer.to_host`).

        The copy is queued on the model's stream (:meth:`session`), behind the work that made the
        tensors, whichever stream the caller has current.
        """
        with self.session():
            return host_transfer.to_host(tree)
