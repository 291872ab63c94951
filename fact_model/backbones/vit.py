"""B-cos ViT-c backbones (B-cos-v2's Simple ViT with a convolutional stem), as token grids.

The networks are the ``bcos`` package's own (``bcos.models.vit.SimpleViT`` and its
``vitc_*_patch1_14`` entrypoints) built with the ``bcos`` layers of its B-cos ViT
configuration (``bcos.experiments.ImageNet.vit_final``): B-cos convs and linears, a
centred bias-free layer norm per token and a bias-free group-norm layer norm in the
stem, no activation. So ``net``'s state dict is bcos's, and bcos's own checkpoint
(``BcosSequential(vit, LogitLayer)``, keys ``0.<key>``) loads with ``strict=True``
through :func:`~fact_model.backbones.load_bcos_v2_checkpoint`.

**Tokens as a grid.** The stem turns ``(N, 6, H, W)`` into an ``h × w`` grid of tokens
(``h = H/16`` for the ImageNet models: 14 × 14 at 224 px). Every stage here outputs that
grid as a feature map ``(N, D, h, w)`` (token ``i·w + j`` ↔ position ``(i, j)``, bcos's
token order), and the encoder stages reshape it to ``(N, h·w, D)`` around bcos's encoder
block. A concept layer then acts per token exactly as on a CNN position, and its spatial
maps are token grids the renderer upsamples like a CNN's; nothing else in the library
needs to know it is a transformer.

Stages (concept-layer positions): ``to_patch_embedding`` (tokens with the positional
embedding added, i.e. what the first block reads) and every encoder block
``transformer.encoder_0`` … ``transformer.encoder_{depth-1}`` (the paper uses blocks
4–10 of ViT-c S).

**Head**: mean over tokens → layer norm (centred, no bias) → B-cos linear → ``y/T + b``.
With the norm's std and the B-cos scale detached it is linear in the pooled tokens, so
the closed form of the last concept layer's code gradient applies (derived in
:meth:`BcosViTBackbone.head_linearisation`): ``∂y_c/∂F_p`` is the same for every token.

**Deviation from a bias-free network**: the sinusoidal positional embedding is *added*
to the tokens, an input-independent term. The identities between concept layers and the
logit hold exactly (everything after it is bias-free), but an input map ``∂a/∂x`` of a
quantity ``a`` explains ``a`` minus the embedding's share ``Σ pe ⊙ ∂a/∂tokens``;
explanations report that share (:meth:`BcosViTBackbone.input_offset`,
:class:`~fact_model.explanation.PositionalShares`), so ``Σ x ⊙ map + share = a`` exactly.

**Explanation mode**: the bcos modules switch with their own flag (``detach``; the
attention then detaches its queries and keys), which :class:`BcosExplanationSwitch`
sets from our :func:`~fact_model.bcos.explanation_mode`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from bcos.models import vit as bcos_vit
from bcos.modules import BcosConv2d as BcosVitConv2d
from bcos.modules import BcosLinear as BcosVitLinear
from bcos.modules import DetachableGNLayerNorm2d, DetachableModule, norms
from torch import Tensor, nn

from fact_model.backbones._bcos_layers import logit_layer
from fact_model.backbones._registry import register_backbone
from fact_model.backbones.staged import StagedBackbone
from fact_model.bcos.encoding import LogitLayer
from fact_model.bcos.explanation_mode import Detachable
from fact_model.bcos.functional import unit_norm_rows

__all__ = [
    "IMAGENET_VITS",
    "BcosExplanationSwitch",
    "BcosViTBackbone",
    "EncoderStage",
    "PatchEmbeddingStage",
    "grid_to_tokens",
    "tokens_to_grid",
]

# The ε of bcos.modules.BcosLinear (bcos 0.1.3): ‖z‖ + 1e-12, and |cos| + 1e-6 for B ≠ 2.
# The closed form must use the head's own numbers; tests check it against autograd.
_HEAD_NORM_EPS = 1e-12
_HEAD_COS_EPS = 1e-6

_ENTRYPOINT_WARNING = re.escape("You are trying to use the entrypoints from `bcos.models.vit` directly")


def grid_to_tokens(grid: Tensor) -> Tensor:
    """``(N, C, h, w)`` → ``(N, h·w, C)``, token ``i·w + j`` at position ``(i, j)`` (a view for NHWC grids)."""
    return grid.flatten(2).transpose(1, 2)


def tokens_to_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """``(N, h·w, C)`` → ``(N, C, h, w)``; inverse of :func:`grid_to_tokens`."""
    n, t, c = tokens.shape
    if t != h * w:
        raise ValueError(f"{t} tokens do not form a {h}×{w} grid")
    return tokens.transpose(1, 2).reshape(n, c, h, w)


class PatchEmbeddingStage(nn.Module):
    """Stem + patch embedding + positional embedding, as bcos's ``SimpleViT.forward`` begins.

    ``(N, 6, H, W)`` → ``(N, D, h, w)``: the tokens the first encoder block reads.
    Holds bcos's modules, which stay registered only in ``net`` (this adapter is not
    part of the module tree and has no parameters of its own).
    """

    def __init__(self, embedding: nn.Module, positional: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.positional = positional

    def offset(self, grid: Tensor) -> Tensor:
        """The positional embedding of a token grid ``(N, D, h, w)``, as ``(1, D, h, w)``."""
        _, d, h, w = grid.shape
        pe = self.positional(grid.new_empty(h, w, d))  # (h·w, D); reads only shape, device, dtype
        return tokens_to_grid(pe[None], h, w)

    def forward(self, x6: Tensor) -> Tensor:
        """``(N, 6, H, W)`` → ``(N, D, h, w)`` tokens + positional embedding."""
        patches = self.embedding(x6)  # (N, h, w, D)
        _, h, w, _ = patches.shape
        tokens = patches.flatten(1, 2) + self.positional(patches)  # (N, h·w, D), in bcos's order
        return tokens_to_grid(tokens, h, w)


class EncoderStage(nn.Module):
    """One bcos encoder block (attention + MLP, both residual) on a token grid ``(N, D, h, w)``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, grid: Tensor) -> Tensor:
        """``(N, D, h, w)`` → ``(N, D, h, w)``."""
        _, _, h, w = grid.shape
        return tokens_to_grid(self.block(grid_to_tokens(grid)), h, w)


class BcosExplanationSwitch(Detachable, nn.Module):
    """Carries our explanation-mode flag to the ``bcos`` modules of a network.

    :func:`~fact_model.bcos.explanation_mode` sets ``detach_dynamic`` on every
    :class:`Detachable`; here that sets bcos's own flag on each of ``net``'s
    ``DetachableModule``s (B-cos layers, norms, attention). No parameters; ``net`` is
    referenced, not registered.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self._net = (net,)  # a tuple: not a submodule (keeps state-dict keys unique)

    def _targets(self) -> list[DetachableModule]:
        return [m for m in self._net[0].modules() if isinstance(m, DetachableModule)]

    @property
    def detach_dynamic(self) -> bool:  # type: ignore[override]
        targets = self._targets()
        return bool(targets) and all(m.detach for m in targets)

    @detach_dynamic.setter
    def detach_dynamic(self, value: bool) -> None:
        for module in self._targets():
            module.set_explanation_mode(bool(value))

    def extra_repr(self) -> str:
        return f"bcos_modules={len(self._targets())}"


class BcosViTBackbone(StagedBackbone):
    """A bcos ``SimpleViT`` (B-cos ViT-c) as stages on token grids, with its pool → norm → B-cos linear head.

    Args:
        net: the ``SimpleViT``; its state dict is bcos's ViT's (bcos's checkpoint has
            the keys prefixed with ``0.``, see :attr:`checkpoint_prefix`).
        logit_layer: ``y/T + b`` (bcos keeps it outside the ViT, in ``BcosSequential``).

    ``net(x6)`` alone returns bcos's ViT output, i.e. the logits before the logit layer.
    """

    checkpoint_prefix = "0."
    has_input_offset = True

    def __init__(self, net: bcos_vit.SimpleViT, logit_layer: LogitLayer) -> None:
        head_norm, head_linear = net.linear_head.norm, net.linear_head.linear
        dim = head_linear.in_features
        stages: list[tuple[str, nn.Module]] = [
            ("to_patch_embedding", PatchEmbeddingStage(net.to_patch_embedding, net.positional_embedding))
        ]
        stages += [(f"transformer.{name}", EncoderStage(block)) for name, block in net.transformer.named_children()]
        super().__init__(net, stages, head_linear, logit_layer, [dim] * len(stages))
        self._head_norm = (head_norm,)  # referenced, not registered again
        self.explanation_switch = BcosExplanationSwitch(net)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def head_norm(self) -> nn.Module:
        """The layer norm between the token pooling and the B-cos linear head."""
        return self._head_norm[0]

    def _pool(self, features: Tensor) -> Tensor:
        """``(N, D, h, w)`` → ``(N, D)``: the mean over tokens (bcos pools before its head)."""
        return features.mean(dim=(2, 3))

    def head_scores(self, features: Tensor) -> Tensor:
        """``(N, D, h, w)`` final tokens → ``(N, num_classes)`` scores ``y = logit − b``."""
        return self.net.linear_head(self._pool(features)) / self.logit_layer.temperature

    def forward_head(self, features: Tensor) -> Tensor:
        """``(N, D, h, w)`` final tokens → ``(N, num_classes)`` logits (bias included)."""
        return self.logit_layer(self.net.linear_head(self._pool(features)))

    @property
    def head_has_closed_form(self) -> bool:
        """True for bcos's head: identity latent, a centred layer norm, a B-cos linear without MaxOut."""
        norm = self.head_norm
        return (
            isinstance(self.net.to_latent, nn.Identity)
            and isinstance(norm, norms.DetachableLayerNorm)
            and len(norm.normalized_shape) == 1
            and isinstance(self.head, BcosVitLinear)
            and self.head.max_out == 1
        )

    def head_linearisation(self, features: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The head as a linear map of the final tokens, its input-dependent factors detached.

        With ``m = (1/P) Σ_p F_p`` the pooled token, the norm gives
        ``z = γ ⊙ (m − mean(m)) / σ`` (``σ = sqrt(var(m) + ε)``, detached) and the B-cos
        linear ``y_c = s_c ŵ_c·z / T`` (``s_c = |cos(z, ŵ_c)|^(B-1)``, detached). Centring is
        self-adjoint, ``ŵ·(γ ⊙ (m − mean m)) = (γ⊙ŵ − mean(γ⊙ŵ))·m``, so

            ∂y_c/∂F_p = s_c / (σ·P·T) · (γ⊙ŵ_c − mean(γ⊙ŵ_c)),

        the same for every token ``p`` (the head pools before it normalises).

        Args:
            features: ``(N, D, h, w)`` the head's input.
            classes: ``(N,)`` class per image.

        Returns:
            ``scale`` ``(N, P)`` and ``direction`` ``(N, D)``, detached.
        """
        norm, linear = self.head_norm, self.head
        with torch.no_grad():
            n, d, h, w = features.shape
            pooled = self._pool(features)  # (N, D)
            var, mean = torch.var_mean(pooled, dim=-1, unbiased=False, keepdim=True)
            std = (var + norm.eps).sqrt()  # (N, 1)
            gamma = norm.weight if norm.weight is not None else pooled.new_ones(d)
            z = gamma * (pooled - mean) / std  # the norm's output (N, D)
            w_c = unit_norm_rows(linear.linear.weight)[classes]  # (N, D)
            if linear.b == 1:
                s = pooled.new_ones(n)
            else:
                cos = (w_c * z).sum(dim=-1) / (torch.linalg.vector_norm(z, dim=-1) + _HEAD_NORM_EPS)
                s = cos.abs() if linear.b == 2 else (cos.abs() + _HEAD_COS_EPS).pow(linear.b - 1)
            direction = gamma * w_c
            direction = direction - direction.mean(dim=-1, keepdim=True)
            scale = s / (std[:, 0] * h * w * self.logit_layer.temperature)  # (N,)
            return scale[:, None].expand(n, h * w), direction

    def input_offset(self, first_output: Tensor) -> Tensor:
        """The positional embedding ``(1, D, h, w)`` that the first stage adds to the tokens."""
        stage = self.stages[0][1]
        assert isinstance(stage, PatchEmbeddingStage)
        return stage.offset(first_output)


# ---------------------------------------------------------------------------- builders
def _bcos_vit_layers(b: float, max_out: int) -> dict[str, Any]:
    """The layers of bcos's B-cos ViT configuration (``vit_final``), with B and MaxOut as given."""
    return dict(
        linear_layer=partial(BcosVitLinear, b=b, max_out=max_out),
        conv2d_layer=partial(BcosVitConv2d, b=b, max_out=max_out),
        norm_layer=norms.NoBias(norms.DetachableLayerNorm),
        norm2d_layer=norms.NoBias(DetachableGNLayerNorm2d),
        act_layer=nn.Identity,
        channels=6,
    )


def _build(
    make_vit: Callable[..., bcos_vit.SimpleViT],
    num_classes: int,
    b: float,
    max_out: int,
    logit_bias: float | None,
    logit_temperature: float | None,
    **structure: Any,
) -> BcosViTBackbone:
    if not (isinstance(b, int | float) and b >= 1):
        raise ValueError(f"b must be a real number ≥ 1, got {b!r}")
    if not (isinstance(max_out, int) and max_out >= 1):
        raise ValueError(f"max_out must be an int ≥ 1, got {max_out!r}")
    with warnings.catch_warnings():
        # bcos warns when its ViT is built outside its own entrypoints, because those add
        # the logit layer; BcosViTBackbone adds it.
        warnings.filterwarnings("ignore", message=_ENTRYPOINT_WARNING, category=UserWarning)
        net = make_vit(num_classes=num_classes, **_bcos_vit_layers(b, max_out), **structure)
    return BcosViTBackbone(net, logit_layer(num_classes, logit_bias, logit_temperature))


@register_backbone("bcos_vitc")
def bcos_vitc(
    num_classes: int = 10,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 128,
    conv_stem: Sequence[int] = (16, 32, 64),
    b: float = 2,
    max_out: int = 1,
    logit_bias: float | None = None,
    logit_temperature: float | None = None,
) -> BcosViTBackbone:
    """A small B-cos ViT-c (bcos's ``SimpleViT``, 1×1 patches after a conv stem), sized for CPU.

    Args:
        num_classes: output classes.
        dim: token width ``D`` (a multiple of 4, ≥ 8: the sin-cos positional embedding
            splits it in four); divisible by ``heads``.
        depth: encoder blocks. heads: attention heads. mlp_dim: hidden width of the MLPs.
        conv_stem: output channels of the stem's 3×3 convs; a conv widening its input has
            stride 2, so ``(16, 32, 64)`` turns a 32 px image into a 4 × 4 token grid.
        b: B-cos exponent of every layer. max_out: MaxOut units.
        logit_bias: default ``-log(num_classes - 1)``. logit_temperature: default 1.
    """
    if not (isinstance(dim, int) and dim >= 8 and dim % 4 == 0):
        raise ValueError(f"dim must be an int ≥ 8 and a multiple of 4, got {dim!r}")
    if not (isinstance(heads, int) and heads >= 1 and dim % heads == 0):
        raise ValueError(f"heads must be a positive int dividing dim={dim}, got {heads!r}")
    for name, value in (("depth", depth), ("mlp_dim", mlp_dim)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    stem = list(conv_stem)
    if not stem or not all(isinstance(c, int) and c >= 1 for c in stem):
        raise ValueError(f"conv_stem must be a non-empty list of positive ints, got {conv_stem!r}")
    return _build(
        bcos_vit.SimpleViT,
        num_classes,
        b,
        max_out,
        logit_bias,
        logit_temperature,
        image_size=14,  # nominal: bcos only checks divisibility by the patch size; the grid follows the input
        patch_size=1,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        conv_stem=stem,
    )


IMAGENET_VITS: dict[str, Callable[..., bcos_vit.SimpleViT]] = {
    "vitc_ti_patch1_14": bcos_vit.vitc_ti_patch1_14,
    "vitc_s_patch1_14": bcos_vit.vitc_s_patch1_14,
    "vitc_b_patch1_14": bcos_vit.vitc_b_patch1_14,
}
"""B-cos-v2 ImageNet ViT-c models (224 px → 14 × 14 tokens), bcos's own entrypoints."""


def _imagenet_builder(make_vit: Callable[..., bcos_vit.SimpleViT]) -> Callable[..., BcosViTBackbone]:
    def build(
        num_classes: int = 1000,
        b: float = 2,
        max_out: int = 1,
        logit_bias: float | None = None,
        logit_temperature: float | None = None,
    ) -> BcosViTBackbone:
        return _build(make_vit, num_classes, b, max_out, logit_bias, logit_temperature)

    build.__doc__ = f"B-cos-v2's ``{make_vit.__name__}`` (ImageNet defaults: 1000 classes, B=2, no MaxOut)."
    return build


for _name, _make in IMAGENET_VITS.items():
    register_backbone(f"bcos_v2_{_name}")(_imagenet_builder(_make))
