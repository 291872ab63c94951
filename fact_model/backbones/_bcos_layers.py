"""Glue for building ``bcos`` package architectures out of our layers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from fact_model.backbones.staged import StagedBackbone
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


def build_with_our_layers(
    network_cls: Callable[..., nn.Module],
    num_classes: int,
    b: float,
    max_out: int,
    norm: str,
    logit_bias: float | None,
    logit_temperature: float | None,
    **structure: Any,
) -> nn.Module:
    """Instantiate a ``bcos`` network class (6 input channels) with our convs, norms and logit layer."""
    net = network_cls(
        num_classes=num_classes,
        in_chans=6,
        conv_layer=conv_factory(b, max_out),
        norm_layer=norm_factory(norm),
        **structure,
    )
    # bcos builds its own LogitLayer; ours is the same (no parameters) but reports T and b.
    net.logit_layer = logit_layer(num_classes, logit_bias, logit_temperature)
    return net


def imagenet_builder(
    network_cls: Callable[..., nn.Module],
    to_stages: Callable[[nn.Module], StagedBackbone],
    structure: dict[str, Any],
) -> Callable[..., StagedBackbone]:
    """A registry builder for one B-cos-v2 ImageNet architecture (its defaults: 1000 classes, B=2, BNU)."""

    def build(
        num_classes: int = 1000,
        b: float = 2,
        max_out: int = 1,
        norm: str = "bnu",
        logit_bias: float | None = None,
        logit_temperature: float | None = None,
    ) -> StagedBackbone:
        net = build_with_our_layers(
            network_cls,
            num_classes=num_classes,
            b=b,
            max_out=max_out,
            norm=norm,
            logit_bias=logit_bias,
            logit_temperature=logit_temperature,
            **structure,
        )
        return to_stages(net)

    return build
