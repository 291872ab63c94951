"""Glue for building ``bcos`` package architectures out of our layers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from fact_model.bcos.conv import BcosConv2d
from fact_model.bcos.encoding import LogitLayer, default_logit_bias
from fact_model.bcos.norms import make_norm_layer


def conv_factory(b: float, max_out: int) -> Callable[..., BcosConv2d]:
    """A ``conv_layer`` argument for ``bcos`` model constructors, building our :class:`BcosConv2d`."""
    return partial(BcosConv2d, b=b, max_out=max_out)


def norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """A ``norm_layer`` argument for ``bcos`` model constructors (``"bnu"`` or ``"pnu"``)."""
    return make_norm_layer(norm)


def logit_layer(num_classes: int, logit_bias: float | None, logit_temperature: float | None) -> LogitLayer:
    """Our logit layer with B-cos-v2's default bias ``-log(num_classes - 1)``."""
    bias = default_logit_bias(num_classes) if logit_bias is None else float(logit_bias)
    return LogitLayer(logit_temperature=logit_temperature, logit_bias=bias)
