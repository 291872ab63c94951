"""How the B-cos layers hand over to the Triton kernels of ``kernels/`` (CUDA).

The layers call :func:`triton_runs_on` on their input. With ``FACT_KERNELS=auto`` (the default) it is
true for CUDA inputs when no gradient is being recorded (plain inference);
``FACT_KERNELS=triton`` uses the kernels on CUDA always, and on the CPU under ``TRITON_INTERPRET=1``
(tests); ``FACT_KERNELS=torch`` never. Float64 inputs and graphs being exported (ONNX) always take
the PyTorch path. Importing :mod:`kernels._common` does not import
Triton; the kernel modules are imported only when a layer first runs on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fact_model.bcos.functional import unit_norm_rows
from kernels._common import triton_runs_on

if TYPE_CHECKING:
    from kernels.bcos_conv import WeightLayouts

__all__ = ["KernelWeightsCache", "triton_runs_on"]


class KernelWeightsCache:
    """Mixin for a B-cos layer with a ``weight``: its unit-norm filters for the kernels, cached.

    Normalising and re-laying out the filters is repeated work at inference, where the
    weight does not change; the cache is keyed on the parameter's storage, version
    counter (bumped by every in-place update: optimiser steps, ``load_state_dict``)
    and dtype. When the weight's gradient is wanted (training, grad enabled) nothing
    is cached and ``ŵ`` stays in the autograd graph. In explanation mode the filters
    are constants (only input gradients are explanations).
    """

    _kernel_weights: tuple[tuple, WeightLayouts] | None = None

    def _weights_cache(self, dtype: torch.dtype) -> WeightLayouts:
        """``ŵ`` in ``dtype`` with its kernel layouts (made on first use, then cached with it)."""
        from kernels.bcos_conv import WeightLayouts

        weight: Tensor = self.weight  # type: ignore[attr-defined]
        wants_weight_grad = torch.is_grad_enabled() and weight.requires_grad and not self.detach_dynamic  # type: ignore[attr-defined]
        if wants_weight_grad:
            return WeightLayouts(_as_filters(unit_norm_rows(weight).to(dtype)))
        key = (weight.data_ptr(), weight._version, dtype, weight.device)
        if self._kernel_weights is None or self._kernel_weights[0] != key:
            with torch.no_grad():
                self._kernel_weights = (key, WeightLayouts(_as_filters(unit_norm_rows(weight).to(dtype))))
        return self._kernel_weights[1]


def _as_filters(weight_hat: Tensor) -> Tensor:
    """The kernels treat a linear layer as a 1×1 convolution: ``(O, C)`` → ``(O, C, 1, 1)``."""
    return weight_hat[:, :, None, None] if weight_hat.ndim == 2 else weight_hat
