"""A B-cos CNN seen as a sequence of named stages followed by a B-cos head.

FaCT inserts concept layers *between* stages, so a backbone must say what its
stages are. :class:`StagedBackbone` wraps the original network (``net``, whose
state dict is exactly that of the source architecture, e.g. a B-cos-v2 model) and
lists references to its stage modules in forward order; the stages are not
re-registered, so the state dict keys stay ``net.<original key>``.

    x6 (N, 6, H, W) → stage₁ → … → stageₙ → F (N, C, h, w)
      → head: B-cos 1×1 conv (N, classes, h, w) → mean over h·w → logit layer (y/T + b)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from fact_model.bcos.conv import BcosConv2d
from fact_model.bcos.encoding import LogitLayer

__all__ = ["StagedBackbone"]


class StagedBackbone(nn.Module):
    """A B-cos network split into named stages, a B-cos 1×1 head and a logit layer.

    Args:
        net: the wrapped network (its state dict is this module's under ``net.``).
        stages: ``(name, module)`` pairs in forward order; every module must be a
            submodule of ``net``. Names are the modules' dotted paths in ``net``
            (``"layer4"``, ``"features.norm5"``), which is how concept layers are placed.
        head: the classifier, a B-cos 1×1 convolution to ``num_classes`` channels.
        logit_layer: temperature and bias applied after global average pooling.
        stage_channels: output channel count of every stage (same order).
    """

    arch_name: str = ""
    arch_kwargs: dict[str, Any]

    def __init__(
        self,
        net: nn.Module,
        stages: Sequence[tuple[str, nn.Module]],
        head: BcosConv2d,
        logit_layer: LogitLayer,
        stage_channels: Sequence[int],
    ) -> None:
        super().__init__()
        if len(stages) != len(stage_channels):
            raise ValueError("stages and stage_channels must have the same length")
        self.net = net
        # A plain tuple: referenced, not registered again (keeps state-dict keys unique).
        self._stages: tuple[tuple[str, nn.Module], ...] = tuple(stages)
        self._stage_channels = dict(zip((n for n, _ in stages), stage_channels, strict=True))
        self._head_parts = (head, logit_layer)  # tuple: not re-registered either
        self.arch_kwargs = {}

    @property
    def stages(self) -> tuple[tuple[str, nn.Module], ...]:
        """``(name, module)`` in forward order."""
        return self._stages

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Names of the stages, i.e. the valid concept-layer positions."""
        return tuple(name for name, _ in self._stages)

    def stage_channels(self, name: str) -> int:
        """Number of output channels of stage ``name``."""
        try:
            return self._stage_channels[name]
        except KeyError:
            raise ValueError(f"unknown stage {name!r}; valid: {list(self.stage_names)}") from None

    @property
    def head(self) -> BcosConv2d:
        """The B-cos 1×1 classifier convolution."""
        return self._head_parts[0]

    @property
    def logit_layer(self) -> LogitLayer:
        """Temperature ``T`` and bias ``b`` of the logits."""
        return self._head_parts[1]

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    def head_scores(self, features: Tensor) -> Tensor:
        """``(N, C, h, w)`` final features → ``(N, num_classes)`` scores ``y = logit − b``.

        Explanations decompose these; adding ``b`` first would cost float32
        precision when ``|y| ≪ |b|``.
        """
        return self.head(features).mean(dim=(2, 3)) / self.logit_layer.temperature

    def forward_head(self, features: Tensor) -> Tensor:
        """``(N, C, h, w)`` final features → ``(N, num_classes)`` logits (bias included)."""
        return self.logit_layer(self.head(features).mean(dim=(2, 3)))

    def forward(self, x6: Tensor) -> Tensor:
        """``(N, 6, H, W)`` encoded images → ``(N, num_classes)`` logits."""
        h = x6
        for _, stage in self._stages:
            h = stage(h)
        return self.forward_head(h)

    def extra_repr(self) -> str:
        return f"arch={self.arch_name!r}, stages={list(self.stage_names)}"
