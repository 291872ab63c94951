"""B-cos ResNets: a small family for CPU training, and B-cos-v2's ImageNet models.

The network structure comes from the ``bcos`` package (``bcos.models.resnet``),
built with our layers (:class:`~fact_model.bcos.BcosConv2d`, our uncentred norms
and logit layer), so its state dict is that of a B-cos-v2 checkpoint.

Stages (concept-layer positions): ``conv1``, ``bn1``, ``pool`` (ImageNet stem only),
``layer1`` … ``layer4`` (the small family has three layers).
"""

from __future__ import annotations

from bcos.models import resnet as bcos_resnet

from fact_model.backbones._bcos_layers import build_with_our_layers, imagenet_builder
from fact_model.backbones._registry import register_backbone
from fact_model.backbones.staged import StagedBackbone

__all__ = ["IMAGENET_RESNETS", "SMALL_RESNET_DEPTHS"]


def _stage(net: bcos_resnet.BcosResNet) -> StagedBackbone:
    """Wrap a ``BcosResNet`` as stages; mirrors ``BcosResNet.forward`` exactly."""
    stages = [("conv1", net.conv1), ("bn1", net.bn1)]
    channels = [net.conv1.out_channels, net.conv1.out_channels]
    if net.pool is not None:
        stages.append(("pool", net.pool))
        channels.append(channels[-1])
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(net, name)
        if layer is None:
            continue
        stages.append((name, layer))
        last_block = layer[-1]
        last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
        channels.append(last_conv.out_channels)
    return StagedBackbone(net, stages, net.fc, net.logit_layer, channels)


def _build(structure: dict, **hyper: object) -> StagedBackbone:
    return _stage(build_with_our_layers(bcos_resnet.BcosResNet, **hyper, **structure))


SMALL_RESNET_DEPTHS: dict[int, list[int]] = {8: [1, 1, 1], 14: [2, 2, 2], 20: [3, 3, 3]}
"""Blocks per stage of the small family (BasicBlocks, three stages, 6n+2 layers)."""


def _small_resnet(depth: int):
    blocks = SMALL_RESNET_DEPTHS[depth]

    def build(
        num_classes: int = 10,
        width: int = 16,
        small_inputs: bool = True,
        b: float = 2,
        max_out: int = 1,
        norm: str = "bnu",
        logit_bias: float | None = None,
        logit_temperature: float | None = None,
    ) -> StagedBackbone:
        """A B-cos ResNet of the small family (6n+2 layers) for small images (32–64 px), sized for CPU training.

        Args:
            num_classes: output classes.
            width: channels of the first stage (stages have width, 2·width, 4·width).
            small_inputs: True for a 3×3 stride-1 stem (32 px images); False for the
                7×7 stride-2 stem + pooling (4× fewer positions, for 64 px images).
            b: B-cos exponent of every layer. max_out: MaxOut units.
            norm: ``"bnu"`` (uncentred batch norm) or ``"pnu"`` (uncentred position norm).
            logit_bias: default ``-log(num_classes - 1)``. logit_temperature: default 1.
        """
        structure = dict(block=bcos_resnet.BasicBlock, layers=blocks, inplanes=width, small_inputs=small_inputs)
        return _build(
            structure,
            num_classes=num_classes,
            b=b,
            max_out=max_out,
            norm=norm,
            logit_bias=logit_bias,
            logit_temperature=logit_temperature,
        )

    return build


for _depth in SMALL_RESNET_DEPTHS:
    register_backbone(f"bcos_resnet{_depth}")(_small_resnet(_depth))


IMAGENET_RESNETS: dict[str, dict] = {
    "resnet18": dict(block=bcos_resnet.BasicBlock, layers=[2, 2, 2, 2]),
    "resnet34": dict(block=bcos_resnet.BasicBlock, layers=[3, 4, 6, 3]),
    "resnet50": dict(block=bcos_resnet.Bottleneck, layers=[3, 4, 6, 3]),
    "resnet101": dict(block=bcos_resnet.Bottleneck, layers=[3, 4, 23, 3]),
    "resnet152": dict(block=bcos_resnet.Bottleneck, layers=[3, 8, 36, 3]),
    "resnext50_32x4d": dict(block=bcos_resnet.Bottleneck, layers=[3, 4, 6, 3], groups=32, width_per_group=4),
}
"""B-cos-v2 ImageNet ResNets (the "long" checkpoints share these architectures)."""


for _name, _spec in IMAGENET_RESNETS.items():
    register_backbone(f"bcos_v2_{_name}")(imagenet_builder(bcos_resnet.BcosResNet, _stage, _spec))
