"""What every kernel file shares: the on/off switch, where Triton may run, input checks.

Kernels run on CUDA tensors. On the CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before :mod:`triton` is first imported), which is how the
test suite checks them on a machine without a GPU. Everywhere else the PyTorch
reference of each kernel file is used.

``fact_model.options.current().kernels`` (``FACT_KERNELS``) selects the implementation the model
layers use:

* ``auto`` (default) — Triton kernels for CUDA tensors in inference (no autograd graph being
  recorded: ``/predict``, ``fact evaluate``), the PyTorch reference elsewhere. Passes that record
  a graph (explanations, training) stay on PyTorch by default because that is what measured
  faster on the H100 (``docs/BENCHMARKS.md``: forward 1.24× faster with the kernels, explain
  0.70×). That run predates the explanation-backward work recorded there (channels_last data
  gradients, the fused data-gradient kernel, batched VJPs): re-measure before changing this;
* ``triton`` — Triton kernels on CUDA for every pass, and on the CPU too when the interpreter is on;
* ``torch`` — always the PyTorch reference (the kernels are off).

It is asked at each call, so ``with fact_model.options.using(kernels=...)`` switches it for a
block (an A/B comparison).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch
from torch import Tensor

from fact_model import options

__all__ = [
    "KernelInputError",
    "check_same_device",
    "check_tensor",
    "interpreting",
    "kernels_mode",
    "launchable",
    "next_power_of_two",
    "sm_count",
    "triton_runs_on",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def next_power_of_two(n: int) -> int:
    """The smallest power of two ≥ ``n`` (1 for ``n ≤ 1``): tile sizes, dispatch buckets."""
    return 1 << (max(1, int(n)) - 1).bit_length()


class KernelInputError(ValueError):
    """A launcher refused its arguments (wrong device, dtype, shape or layout)."""


def kernels_mode() -> str:
    """The kernel mode in force (``auto``, ``triton`` or ``torch``): :func:`fact_model.options.current`."""
    return options.current().kernels


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (Triton's own ``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(tensor: Tensor) -> bool:
    """Whether the model layers should use the Triton kernels for ``tensor`` (float32/16, bfloat16 only)."""
    mode = kernels_mode()
    if mode == "torch" or tensor.dtype not in FLOAT_DTYPES:  # e.g. float64 checks run the reference
        return False
    if torch.compiler.is_exporting():  # an exported graph (ONNX) must hold standard operators only
        return False
    if mode == "auto":
        return tensor.is_cuda and not torch.is_grad_enabled()
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    contiguous: bool = True,
    channels_last: bool = False,
) -> Tensor:
    """Refuse ``tensor`` unless a kernel can read it; the message names the argument.

    Args:
        name: the argument's name, quoted in the error.
        ndim: required number of dimensions (any when ``None``).
        dtypes: accepted dtypes.
        contiguous: require a dense row-major (or, with ``channels_last``, NHWC) layout.
        channels_last: the layout required when ``contiguous`` is set, for 4-d tensors.

    Raises:
        KernelInputError: on any mismatch.
    """
    if not isinstance(tensor, Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())):
        raise KernelInputError(
            f"{name} is on {tensor.device}: Triton kernels need CUDA tensors "
            "(or CPU tensors under TRITON_INTERPRET=1); use the PyTorch reference instead"
        )
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        raise KernelInputError(f"{name} has dtype {tensor.dtype}; supported: {[str(d) for d in dtypes]}")
    if ndim is not None and tensor.ndim != ndim:
        raise KernelInputError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if contiguous:
        if channels_last and tensor.ndim == 4:
            if not tensor.is_contiguous(memory_format=torch.channels_last):
                raise KernelInputError(f"{name} must be channels_last (NHWC) contiguous, got strides {tensor.stride()}")
        elif not tensor.is_contiguous():
            raise KernelInputError(f"{name} must be contiguous, got strides {tensor.stride()}")
    return tensor


def check_same_device(**tensors: Tensor) -> None:
    """Refuse tensors that live on different devices; the message names them all."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise KernelInputError(f"all tensors must be on one device: {listing}")


def launchable(kernel: object, tensor: Tensor) -> object:
    """``kernel`` as the launcher should call it for ``tensor``.

    While ``torch.compile``/``torch.export`` traces (or on FakeTensors), the kernel goes
    through :func:`torch.library.wrap_triton` so the tracer records it. Eagerly, the
    plain kernel: ``wrap_triton`` would route every launch through a higher-order
    operator, which costs more than a small kernel runs.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or isinstance(tensor, FakeTensor):
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (2 for the CPU interpreter): sizes grids to fill the GPU."""
    if device.type != "cuda":
        return 2
    return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
