"""A B-cos network seen as a sequence of named stages followed by a B-cos head.

FaCT inserts concept layers *between* stages, so a backbone must say what its
stages are. :class:`StagedBackbone` wraps the original network (``net``, whose
state dict is exactly that of the source architecture, e.g. a B-cos-v2 model) and
lists references to its stage modules in forward order; the stages are not
re-registered, so the state dict keys stay ``net.<original key>``.

    x6 (N, 6, H, W) → stage₁ → … → stageₙ → F (N, C, h, w)
      → head: B-cos 1×1 conv (N, classes, h, w) → mean over h·w → logit layer (y/T + b)

Every stage maps a feature map ``(N, C, h, w)`` to a feature map, also for token
networks: a ViT's stages see their ``h·w`` tokens as an ``(N, C, h, w)`` grid
(:mod:`fact_model.backbones.vit`), so concept layers, spatial maps and rendering
are the same code for both.

The head is what explanations need to know about in closed form: given the head's
input ``F`` with its input-dependent factors detached, ``y_c = logit_c − b`` is
linear in ``F``, ``∂y_c/∂F_p = scale[p] · direction`` (:meth:`StagedBackbone.head_linearisation`).
Subclasses with another head (the ViT's pool → norm → B-cos linear) override the
``head_*`` methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fact_model.bcos.conv import BcosConv2d
from fact_model.bcos.encoding import LogitLayer
from fact_model.bcos.functional import PATCH_NORM_EPS, dynamic_scale, unit_norm_rows

__all__ = ["StagedBackbone"]


class StagedBackbone(nn.Module):
    """A B-cos network split into named stages, a B-cos 1×1 head and a logit layer.

    Args:
        net: the wrapped network (its state dict is this module's under ``net.``).
        stages: ``(name, module)`` pairs in forward order; every module must be a
            submodule of ``net`` (or a parameter-free adapter around one, e.g. the
            ViT's token ↔ grid reshapes). Names are the modules' dotted paths in ``net``
            (``"layer4"``, ``"features.norm5"``), which is how concept layers are placed.
        head: the classifier, a B-cos 1×1 convolution to ``num_classes`` channels
            (subclasses may pass another head and override the ``head_*`` methods).
        logit_layer: temperature and bias applied after global average pooling.
        stage_channels: output channel count of every stage (same order).
    """

    arch_name: str = ""
    arch_kwargs: dict[str, Any]
    checkpoint_prefix: str = ""
    """Key prefix of the source model's own state dict in front of ``net``'s keys ("" when
    they coincide); :func:`~fact_model.backbones.load_bcos_v2_checkpoint` strips it."""
    has_input_offset: bool = False
    """Whether the first stage adds an input-independent term (see :meth:`input_offset`)."""

    def __init__(
        self,
        net: nn.Module,
        stages: Sequence[tuple[str, nn.Module]],
        head: nn.Module,
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
    def head(self) -> nn.Module:
        """The B-cos classifier (a 1×1 convolution here; its ``b`` is the manifest's ``B``)."""
        return self._head_parts[0]

    @property
    def logit_layer(self) -> LogitLayer:
        """Temperature ``T`` and bias ``b`` of the logits."""
        return self._head_parts[1]

    @property
    def num_classes(self) -> int:
        return self.head.out_channels

    @property
    def head_has_closed_form(self) -> bool:
        """Whether :meth:`head_linearisation` applies: a plain 1×1 B-cos conv (stride 1, one group, no MaxOut)."""
        head = self.head
        return (
            isinstance(head, BcosConv2d)
            and head.kernel_size == (1, 1)
            and head.stride == (1, 1)
            and head.groups == 1
            and head.max_out == 1
        )

    def head_linearisation(self, features: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The head as a linear map of its input, its input-dependent factors detached.

        ``y_c = (1/(P·T)) Σ_p s_{c,p} ŵ_c·F_p`` with ``s_{c,p} = |cos(F_p, ŵ_c)|^(B-1)``, so
        ``∂y_c/∂F_p = scale[p] · direction`` with ``scale = s_{c,p}/(P·T)``, ``direction = ŵ_c``.

        Args:
            features: ``(N, C, h, w)`` the head's input (detached).
            classes: ``(N,)`` class per image.

        Returns:
            ``scale`` ``(N, P)`` and ``direction`` ``(N, C)``, detached (``P = h·w``).
        """
        head = self.head
        with torch.no_grad():
            flat = features.flatten(2)  # (N, C, P)
            n, _, p = flat.shape
            direction = unit_norm_rows(head.weight).flatten(1)[classes]  # (N, C)
            if head.b == 1:
                scale = flat.new_ones(n, p)
            else:
                linear_out = torch.einsum("nc,ncp->np", direction, flat)
                norms = (flat.square().sum(dim=1) + PATCH_NORM_EPS).sqrt()
                scale = dynamic_scale(linear_out, norms, head.b)
            return scale / (p * self.logit_layer.temperature), direction

    def input_offset(self, first_output: Tensor) -> Tensor | None:
        """The input-independent term the first stage adds to its output, or None (bias-free).

        A B-cos CNN has none: every number is then ``Σ x ⊙ ∂/∂x`` exactly. A ViT adds its
        positional embedding after the patch embedding; explanations report that term's
        share of a map separately (it is not a function of the pixels).

        Args:
            first_output: ``(N, C, h, w)`` output of the first stage.

        Returns:
            None, or a tensor broadcastable to ``first_output``.
        """
        return None

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
