"""Bias-free, uncentred normalisation layers (B-cos-v2; spec section 2).

Both divide by a standard deviation and multiply by a learnt per-channel weight;
neither subtracts a mean nor adds a bias, so the layer is ``x ↦ (weight/std) ⊙ x``:
dynamic-linear, with ``std`` as its input-dependent factor (detached in
explanation mode).

State-dict compatible with B-cos-v2's ``NoBias(BatchNormUncentered2d)`` (the norm
of its "long" ImageNet models) and ``NoBias(PositionNormUncentered2d)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fact_model.bcos.explanation_mode import Detachable, module_flags

__all__ = [
    "NORM_LAYERS",
    "BatchNormUncentered2d",
    "PositionNormUncentered2d",
    "make_norm_layer",
    "synchronised_batch_norms",
]


def _variance(x: Tensor, dims: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """Biased (centred) variance over ``dims`` as two plain reductions.

    ``Tensor.var`` uses a single-threaded Welford pass here that measured 4–7× slower
    on (N, C, H, W) activations than mean-then-mean-of-squared-deviations, which is
    just as accurate (the mean is subtracted before squaring).
    """
    mean = x.mean(dim=dims, keepdim=True)
    return (x - mean).square().mean(dim=dims, keepdim=keepdim)


class _SumOverRanks(torch.autograd.Function):
    """``Σ_ranks t`` on every rank; its gradient is again summed over the ranks (each rank's output
    feeds that rank's loss, and the objective is the sum of the ranks' losses)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total)
        return total


def _global_channel_variance(x: Tensor) -> Tensor:
    """``(C,)`` centred variance of ``(N, C, H, W)`` over the batches of *all* ranks of the process group.

    Two differentiable all-reduces (sums, then squared deviations from the global mean), so the
    gradient flows to every rank's inputs as if the ranks' batches were one batch (as
    :class:`torch.nn.SyncBatchNorm` does for a centred norm). A rank with an empty batch takes part.
    """
    all_reduce = _SumOverRanks.apply
    count = x.new_tensor([x.numel() // x.shape[1]])
    totals = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
    mean = totals[:-1] / totals[-1]
    deviations = (x - mean[None, :, None, None]).square().sum(dim=(0, 2, 3))
    return all_reduce(deviations) / totals[-1]


class BatchNormUncentered2d(Detachable, nn.BatchNorm2d):
    """Uncentred batch norm: ``weight ⊙ x / sqrt(var + eps)``.

    In training, ``var`` is the (centred) batch variance per channel and updates
    ``running_var``; in eval, ``running_var`` is used, so images of a batch do not
    interact at inference. ``running_mean`` exists for checkpoint compatibility and
    is never used. No bias parameter. With ``synchronise`` set (by
    :func:`synchronised_batch_norms`, for data-parallel training) the batch is the union
    of every rank's batch, so training on W processes normalises as one process would.

    Shapes: ``(N, C, H, W)`` → same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, **kwargs: object) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, **kwargs)  # type: ignore[arg-type]
        self.bias = None  # bias-free: a bias breaks the exact decomposition
        self.synchronise = False

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``(N, C, H, W)`` by the batch (training) or running (eval) std."""
        if x.ndim != 4:
            raise ValueError(f"BatchNormUncentered2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        use_batch_stats = self.training or self.running_var is None
        if use_batch_stats:
            stats_input = x.detach() if self.detach_dynamic else x
            if self.synchronise and self.training and dist.is_initialized() and dist.get_world_size() > 1:
                var = _global_channel_variance(stats_input)
            else:
                var = _variance(stats_input, (0, 2, 3))
            if self.training and self.track_running_stats and self.running_var is not None:
                momentum = self._update_momentum()
                with torch.no_grad():
                    self.running_var.mul_(1 - momentum).add_(var.detach(), alpha=momentum)
        else:
            # Eval: a fixed per-channel factor, applied as one multiply (forward and backward).
            factor = (self.running_var + self.eps).rsqrt()
            if self.weight is not None:
                factor = factor * self.weight
            return x * factor[None, :, None, None]
        std = (var + self.eps).sqrt()[None, :, None, None]
        out = x / std
        if self.weight is not None:
            out = self.weight[None, :, None, None] * out
        return out

    def _update_momentum(self) -> float:
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            return 1.0 / float(self.num_batches_tracked)
        return float(self.momentum)


class PositionNormUncentered2d(Detachable, nn.Module):
    """Uncentred position norm: per location, ``weight ⊙ x / sqrt(var_c(x) + eps)``.

    ``var_c`` is the variance over channels at each spatial position, so the layer
    acts on each image (and location) on its own. No bias parameter.

    Shapes: ``(N, C, H, W)`` → same.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, **factory: object) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``(N, C, H, W)`` by the per-position std over channels."""
        if x.ndim != 4:
            raise ValueError(f"PositionNormUncentered2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
        stats_input = x.detach() if self.detach_dynamic else x
        var = _variance(stats_input, 1, keepdim=True)
        out = x / (var + self.eps).sqrt()
        if self.weight is not None:
            out = self.weight[None, :, None, None] * out
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


@contextlib.contextmanager
def synchronised_batch_norms(module: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """For the block, every :class:`BatchNormUncentered2d` in ``module`` takes its training statistics
    over all ranks of the default process group (a no-op without one); restored on leaving."""
    with module_flags(module, BatchNormUncentered2d, "synchronise", enabled):
        yield module


NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bnu": BatchNormUncentered2d,
    "pnu": PositionNormUncentered2d,
}
"""Norm layers by the short names used in architecture configs."""


def make_norm_layer(name: str) -> type[nn.Module]:
    """The norm layer class for ``name`` (``"bnu"`` or ``"pnu"``)."""
    try:
        return NORM_LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown norm layer {name!r}; valid: {sorted(NORM_LAYERS)}") from None
