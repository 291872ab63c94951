"""B-cos-v2 ImageNet DenseNets, built from ``bcos.models.densenet`` with our layers.

Stages (concept-layer positions) are the children of ``features``:
``features.conv0``, ``features.norm0``, ``features.pool0``, ``features.denseblock1``,
``features.transition1``, …, ``features.denseblock4``, ``features.norm5``.
"""

from __future__ import annotations

from functools import partial

from bcos.models import densenet as bcos_densenet

from fact_model.backbones._bcos_layers import imagenet_builder
from fact_model.backbones._registry import register_backbone
from fact_model.backbones.staged import StagedBackbone

__all__ = ["IMAGENET_DENSENETS"]

IMAGENET_DENSENETS: dict[str, dict] = {
    "densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}


def _channels_after(spec: dict) -> list[tuple[str, int]]:
    """Output channels of each ``features`` child, following DenseNet-BC's bookkeeping."""
    growth, blocks, c = spec["growth_rate"], spec["block_config"], spec["num_init_features"]
    out = [("conv0", c), ("norm0", c), ("pool0", c)]
    for i, num_layers in enumerate(blocks, start=1):
        c += num_layers * growth
        out.append((f"denseblock{i}", c))
        if i != len(blocks):
            c //= 2
            out.append((f"transition{i}", c))
    out.append(("norm5", c))
    return out


def _stage(net: bcos_densenet.BcosDenseNet, spec: dict) -> StagedBackbone:
    """Wrap a ``BcosDenseNet``: the stages are the children of ``features``, in order."""
    children = dict(net.features.named_children())
    channels = _channels_after(spec)
    if [n for n, _ in channels] != list(children):
        raise RuntimeError(f"unexpected DenseNet layout from bcos: {list(children)}")
    stages = [(f"features.{n}", children[n]) for n, _ in channels]
    return StagedBackbone(net, stages, net.classifier, net.logit_layer, [c for _, c in channels])


for _name, _spec in IMAGENET_DENSENETS.items():
    register_backbone(f"bcos_v2_{_name}")(
        imagenet_builder(bcos_densenet.BcosDenseNet, partial(_stage, spec=_spec), _spec)
    )
