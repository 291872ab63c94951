"""The FaCT model: a B-cos backbone with bias-free TopK concept layers in the forward pass.

    images (N, 3, H, W) in [0, 1] → [r,g,b,1-r,1-g,1-b] → stages … → concept layer(s) …
      → B-cos 1×1 head → mean over positions → logit/T + b

(A ViT backbone's stages run on token grids and its head pools first, then normalises
and applies a B-cos linear layer: :mod:`fact_model.backbones.vit`.)

The concept layers replace the features at their stage with the reconstruction
``f̂ = D·TopK(ReLU(E f))``, so accuracy is that of the model with the concepts in
place, and every explanation identity (spec section 1) holds exactly (a ViT adds its
positional embedding to the tokens, a term input maps cannot hold: explanations report
its share beside them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fact_model._validation import ClassSpec, validate_images
from fact_model.backbones import StagedBackbone, create_backbone
from fact_model.bcos.encoding import encode_rgb
from fact_model.bcos.explanation_mode import explanation_mode
from fact_model.concept_layer import ConceptCodes, ConceptLayer
from fact_model.config import FaCTConfig

if TYPE_CHECKING:
    from PIL import Image

    from fact_model.explanation import Explanation
    from fact_model.intervention import Intervention

__all__ = ["ConceptLayerInfo", "FaCTModel", "ForwardRecord"]


@dataclass(frozen=True)
class ConceptLayerInfo:
    """Public description of one concept layer."""

    name: str
    num_concepts: int
    k: int
    in_features: int


@dataclass(frozen=True)
class ForwardRecord:
    """What one forward pass computed, for explanations.

    Attributes:
        logits: ``(N, num_classes)``, bias included.
        scores: ``(N, num_classes)`` = ``logits − b``, computed before the bias is added
            (what explanations decompose, at full float precision).
        codes: concept-layer name → sparse codes, in forward order.
        features: concept-layer name → the stage output ``f`` that layer encoded.
        head_input: ``(N, C, h, w)`` features entering the head (``f̂`` when a concept
            layer sits at the last stage).
        first_output: ``(N, C, h, w)`` output of the first stage when the backbone adds an
            input-independent term there (``backbone.has_input_offset``: a ViT's positional
            embedding), else None; explanations report that term's share of input maps.
    """

    logits: Tensor
    scores: Tensor
    codes: dict[str, ConceptCodes]
    features: dict[str, Tensor]
    head_input: Tensor
    first_output: Tensor | None = None


def _module_key(layer: str) -> str:
    # nn.ModuleDict keys may not contain "."; stage names such as "features.norm5" do.
    return layer.replace(".", "__")


class FaCTModel(nn.Module):
    """Backbone + concept layers, with ``forward`` (logits) and :meth:`explain`.

    Build one from a :class:`~fact_model.config.FaCTConfig`; save and load it with
    :func:`fact_model.save` / :func:`fact_model.load`.

    ``explain`` may be called from several threads: the mode switches it makes
    (eval, explanation mode) are held under ``mode_lock`` during its forward pass.
    """

    def __init__(self, config: FaCTConfig) -> None:
        super().__init__()
        self.mode_lock = threading.RLock()
        kwargs = dict(config.backbone_kwargs)
        kwargs["num_classes"] = len(config.class_names)
        self.config = config
        self.backbone: StagedBackbone = create_backbone(config.backbone, **kwargs)
        stage_order = {name: i for i, name in enumerate(self.backbone.stage_names)}
        for spec in config.concept_layers:
            if spec.layer not in stage_order:
                raise ValueError(
                    f"cannot insert a concept layer at {spec.layer!r}: architecture {config.backbone!r} "
                    f"has stages {list(self.backbone.stage_names)}"
                )
        specs = sorted(config.concept_layers, key=lambda s: stage_order[s.layer])
        self.concepts = nn.ModuleDict(
            {
                _module_key(s.layer): ConceptLayer(self.backbone.stage_channels(s.layer), s.num_concepts, s.k)
                for s in specs
            }
        )
        self._layer_names: tuple[str, ...] = tuple(s.layer for s in specs)

    # A lock is neither copyable nor picklable: copies get a fresh one.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("mode_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.mode_lock = threading.RLock()

    # ------------------------------------------------------------------ properties
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    @property
    def concept_layers(self) -> tuple[ConceptLayerInfo, ...]:
        """The concept layers in forward order (lowest first)."""
        return tuple(
            ConceptLayerInfo(name, layer.num_concepts, layer.k, layer.in_features)
            for name, layer in zip(self._layer_names, self.concepts.values(), strict=True)
        )

    def concept_layer(self, name: str) -> ConceptLayer:
        """The concept layer at stage ``name``."""
        if name not in self._layer_names:
            raise ValueError(f"no concept layer at {name!r}; concept layers: {list(self._layer_names)}")
        return self.concepts[_module_key(name)]  # type: ignore[return-value]

    @property
    def logit_bias(self) -> float:
        """The scalar ``b`` of ``logit = y/T + b``; explanations decompose ``logit − b``."""
        return self.backbone.logit_layer.bias

    @property
    def logit_temperature(self) -> float:
        return self.backbone.logit_layer.temperature

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # ------------------------------------------------------------------ forward
    def forward_encoded(
        self,
        x6: Tensor,
        concepts: bool = True,
        code_leaves: bool = False,
        code_scales: Mapping[str, Tensor] | None = None,
    ) -> ForwardRecord:
        """Forward pass on encoded images ``(N, 6, H, W)``, recording concept codes.

        Args:
            concepts: False runs the plain backbone (concept layers skipped), e.g. to
                compare the backbone's accuracy with the FaCT model's.
            code_scales: an intervention: concept-layer name → ``(N, K)`` factors that multiply
                each concept's codes at that layer before it is decoded (0 removes a concept,
                1 leaves it); the network continues from the edited reconstruction, and the
                recorded codes are the edited ones (:meth:`ConceptCodes.scaled`).
            code_leaves: run each concept layer's encoder outside autograd and make its
                code values fresh leaves that require grad. The graph then stops at
                every concept layer: explanations step across a concept layer with
                :meth:`ConceptLayer.encoder_vjp` (sparse) instead of differentiating
                the dense ``(N, P, K)`` encoder output. Forward values are unchanged.
        """
        unknown = sorted(set(code_scales or ()) - set(self._layer_names))
        if unknown:
            raise ValueError(
                f"code_scales names unknown concept layer(s) {unknown}; concept layers: {list(self._layer_names)}"
            )
        codes: dict[str, ConceptCodes] = {}
        features: dict[str, Tensor] = {}
        first_output = None
        # NHWC: oneDNN/cuDNN convolutions (and especially their input-gradient passes,
        # which explanations run many of) are markedly faster in channels_last, and the
        # concept layer's per-position view of NHWC features needs no copy.
        h = x6.contiguous(memory_format=torch.channels_last)
        for i, (name, stage) in enumerate(self.backbone.stages):
            h = stage(h)
            if i == 0 and self.backbone.has_input_offset:
                first_output = h
            if concepts and name in self._layer_names:
                layer = self.concepts[_module_key(name)]
                features[name] = h
                factors = None if code_scales is None else code_scales.get(name)
                if code_leaves:
                    with torch.no_grad():
                        code = layer.encode(h)
                        if factors is not None:
                            code = code.scaled(factors)
                    code = replace(code, values=code.values.requires_grad_(True))
                else:
                    code = layer.encode(h)
                    if factors is not None:
                        code = code.scaled(factors)
                codes[name] = code
                h = layer.decode(code)
        scores = self.backbone.head_scores(h)
        return ForwardRecord(scores + self.logit_bias, scores, codes, features, h, first_output)

    def _stage_index(self, name: str) -> int:
        names = self.backbone.stage_names
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; valid stages of {self.config.backbone!r}: {list(names)}")
        return names.index(name)

    def features_at(self, x6: Tensor, layer: str) -> Tensor:
        """Output ``f`` of stage ``layer`` for encoded images ``(N, 6, H, W)``.

        Concept layers *below* ``layer`` are applied (the model as it runs); a concept
        layer *at* ``layer`` is not (``f`` is what it would encode).
        """
        stop = self._stage_index(layer)
        h = x6.contiguous(memory_format=torch.channels_last)
        for name, stage in self.backbone.stages[: stop + 1]:
            h = stage(h)
            if name != layer and name in self._layer_names:
                h = self.concepts[_module_key(name)](h)
        return h

    def scores_from(self, features: Tensor, layer: str) -> Tensor:
        """``y = logit − b`` ``(N, num_classes)`` from the output ``f`` of stage ``layer``.

        Applies the concept layer at ``layer`` (if any) and everything after it.
        """
        start = self._stage_index(layer)
        h = features
        if layer in self._layer_names:
            h = self.concepts[_module_key(layer)](h)
        for name, stage in self.backbone.stages[start + 1 :]:
            h = stage(h)
            if name in self._layer_names:
                h = self.concepts[_module_key(name)](h)
        return self.backbone.head_scores(h)

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 3, H, W)`` images in [0, 1] → ``(N, num_classes)`` logits (bias included)."""
        return self.forward_encoded(encode_rgb(images)).logits

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities from logits, with the model's output activation."""
        if self.config.output_activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    @contextmanager
    def explanation_mode(self) -> Iterator[FaCTModel]:
        """Detach every input-dependent factor (spec section 2) inside the block."""
        with explanation_mode(self):
            yield self

    # ------------------------------------------------------------------ inputs
    def validate_images(self, images: object) -> Tensor:
        """Check a batch ``(N, 3, H, W)`` in [0, 1]; returns it on the model's device and dtype."""
        return validate_images(images, self.device, self.dtype)

    def preprocess(self, pil_images: Image.Image | Sequence[Image.Image]) -> Tensor:
        """PIL images (any size and mode) → ``(N, 3, input_size, input_size)`` in [0, 1].

        Follows ``config.preprocessing`` (the recipe recorded in the manifest).
        """
        from fact_model.preprocessing import preprocess_images

        return preprocess_images(pil_images, self.config.preprocessing)

    # ------------------------------------------------------------------ explain
    def explain(
        self,
        images: Tensor,
        target: ClassSpec = None,
        contrast: ClassSpec = None,
        top_k: int = 5,
        maps: bool = False,
        map_kinds: Sequence[str] = ("concepts", "logit", "other"),
        map_layers: Sequence[str] | None = None,
        batched_vjp: bool | None = None,
        code_scales: Mapping[str, Tensor] | None = None,
    ) -> Explanation:
        """Exact concept explanation of a batch; see :func:`fact_model.explain.explain`."""
        from fact_model.explain import explain

        return explain(
            self,
            images,
            target=target,
            contrast=contrast,
            top_k=top_k,
            maps=maps,
            map_kinds=map_kinds,
            map_layers=map_layers,
            batched_vjp=batched_vjp,
            code_scales=code_scales,
        )

    def intervene(
        self,
        images: Tensor,
        *,
        layer: str | None = None,
        remove: Sequence[int] | None = None,
        scale: Mapping[int, float] | None = None,
        remove_top: int | None = None,
        keep_top: int | None = None,
        target: ClassSpec = None,
        contrast: ClassSpec = None,
        top_k: int = 5,
        maps: bool = False,
        map_layers: Sequence[str] | None = None,
    ) -> Intervention:
        """Edit concepts of one layer and explain the edited network: :func:`fact_model.intervention.intervene`."""
        from fact_model.intervention import intervene

        return intervene(
            self,
            images,
            layer=layer,
            remove=remove,
            scale=scale,
            remove_top=remove_top,
            keep_top=keep_top,
            target=target,
            contrast=contrast,
            top_k=top_k,
            maps=maps,
            map_layers=map_layers,
        )

    def extra_repr(self) -> str:
        layers = ", ".join(f"{i.name}: K={i.num_concepts}, k={i.k}" for i in self.concept_layers)
        return f"backbone={self.config.backbone!r}, classes={self.num_classes}, concept_layers=[{layers}]"
