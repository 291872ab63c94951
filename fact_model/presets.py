"""The paper's concept-layer configurations (spec section 7) as named presets.

``fact train concepts --preset resnet50_long/layer4`` takes the architecture, the layer, its
dictionary size K and sparsity k, the preprocessing (B-cos-v2's ImageNet evaluation transform:
shorter side to 256, centre crop 224, bilinear) and the output activation from the preset, and the
SAE recipe of the paper (16 epochs, lr 1e-3, ≈ 32k vectors per batch, 256 auxiliary latents,
36 positions per image) as defaults that explicit flags override. ``--list-presets`` prints them.

The ViT-c S rows: the paper places concept layers after encoder blocks 4–10 with K between 8,192
and 16,384 and k between 32 and 64; the presets use K = 8,192, k = 32 for blocks 4–7 and
K = 16,384, k = 64 for blocks 8–10 (deeper blocks: more, and more distributed, concepts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fact_model.config import ConceptLayerSpec, Preprocessing

__all__ = ["PRESETS", "Preset", "get_preset", "presets_table"]

IMAGENET_EVAL = Preprocessing(224, resize=256, interpolation="bilinear")
"""B-cos-v2's ImageNet evaluation transform (``bcos.data.presets``): resize 256, centre crop 224."""

PAPER_SAE_RECIPE: dict[str, Any] = {
    "epochs": 16,
    "lr": 1e-3,
    "batch_size": 32768,
    "aux_k": 256,
    "positions_per_image": 36,
}
"""SAE training of the paper (spec section 7), as :class:`~fact_model.training.concepts.ConceptTrainConfig` fields."""


@dataclass(frozen=True)
class Preset:
    """One row of spec section 7.

    Attributes:
        name: ``"<model>/<layer>"``, e.g. ``"resnet50_long/layer4"``.
        arch: registered backbone (``fact_model.backbones.list_backbones()``).
        layer: where the concept layer goes, with its K and k.
        preprocessing: how images become the model input.
        output_activation: how logits become probabilities (B-cos-v2 trains with BCE: sigmoid).
        training: :class:`~fact_model.training.concepts.ConceptTrainConfig` defaults.
        reference: the backbone's ImageNet top-1 reported in the paper, for orientation.
    """

    name: str
    arch: str
    layer: ConceptLayerSpec
    preprocessing: Preprocessing = IMAGENET_EVAL
    output_activation: str = "sigmoid"
    training: dict[str, Any] = field(default_factory=lambda: dict(PAPER_SAE_RECIPE))
    reference: str = ""


def _rows() -> list[Preset]:
    rows = []
    for model, arch, top1, layers in (
        ("resnet50_long", "bcos_v2_resnet50", "79.47 %",
         (("layer4", 16384, 16), ("layer3", 16384, 32), ("layer2", 8192, 32))),
        ("densenet121_long", "bcos_v2_densenet121", "77.30 %",
         (("features.norm5", 16384, 16), ("features.transition3", 16384, 32), ("features.transition2", 8192, 32))),
    ):  # fmt: skip
        for layer, num_concepts, k in layers:
            spec = ConceptLayerSpec(layer, num_concepts, k)
            rows.append(Preset(f"{model}/{layer}", arch, spec, reference=f"backbone top-1 {top1}"))
    for block in range(4, 11):
        num_concepts, k = (8192, 32) if block <= 7 else (16384, 64)
        spec = ConceptLayerSpec(f"transformer.encoder_{block}", num_concepts, k)
        rows.append(
            Preset(f"vitc_s/block{block}", "bcos_v2_vitc_s_patch1_14", spec, reference="backbone top-1 74.50 %")
        )
    return rows


PRESETS: dict[str, Preset] = {preset.name: preset for preset in _rows()}
"""Every preset by name."""


def get_preset(name: str) -> Preset:
    """The preset ``name``.

    Raises:
        ValueError: no such preset (the message lists them).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None


def presets_table() -> list[tuple[str, ...]]:
    """Rows ``(name, architecture, layer, K / k, preprocessing, activation, reference)`` for ``--list-presets``."""
    rows = []
    for p in PRESETS.values():
        pre = p.preprocessing
        preprocessing = f"{pre.resize}→{pre.input_size} {pre.interpolation}"
        rows.append(
            (p.name, p.arch, p.layer.layer, f"{p.layer.num_concepts} / {p.layer.k}", preprocessing,
             p.output_activation, p.reference)
        )  # fmt: skip
    return rows
