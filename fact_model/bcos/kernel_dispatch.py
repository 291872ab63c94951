"""How the B-cos layers hand over to the Triton kernels of ``kernels/`` (CUDA).

The layers call :func:`triton_runs_on` on their input: true on CUDA unless
``FACT_KERNELS=torch`` (and on the CPU under ``FACT_KERNELS=triton`` with
``TRITON_INTERPRET=1``, for tests). Importing :mod:`kernels._common` does not import
Triton; the kernel modules are imported only when a layer first runs on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fact_model.bcos.functional import unit_norm_rows
from kernels._common import triton_runs_on

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

    _kernel_weights: tuple[tuple, Tensor, Tensor | None] | None = None

    def _weights_cache(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``(ŵ, ŵ in the fused kernel's layout or None)`` in ``dtype``."""
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        wants_weight_grad = torch.is_grad_enabled() and weight.requires_grad and not self.detach_dynamic  # type: ignore[attr-defined]
        if wants_weight_grad:
            return unit_norm_rows(weight).to(dtype), None
        key = (weight.data_ptr(), weight._version, dtype, weight.device)
        if self._kernel_weights is None or self._kernel_weights[0] != key:
            from kernels.bcos_conv import fused_weight_layout

            with torch.no_grad():
                weight_hat = unit_norm_rows(weight).to(dtype)
                fused = fused_weight_layout(weight_hat) if weight.ndim == 4 and self._fusable() else None
            self._kernel_weights = (key, weight_hat, fused)
        return self._kernel_weights[1], self._kernel_weights[2]

    def _fusable(self) -> bool:
        return getattr(self, "groups", 1) == 1 and getattr(self, "max_out", 1) == 1
