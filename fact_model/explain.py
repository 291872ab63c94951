"""Exact concept explanations of a FaCT model (spec section 4).

One forward pass in explanation mode records every concept layer's sparse codes
``u``, with the autograd graph cut at each concept layer (``code_leaves``). Then,
for the explained quantity ``y`` (``logit[target] − b``, or a contrast difference):

* **last concept layer** — when it feeds the head directly, ``∂y/∂u`` has the
  closed form ``s_{c,p} (Ŵ_head D)[c,k] / (P·T)`` (no backward pass; a ViT's
  pool → norm → B-cos linear head has its own, the same for every token, see
  :func:`closed_form_code_gradient`); otherwise one backward from ``y``;
* **lower concept layers** — ``∂y/∂u`` is carried down one segment at a time:
  a sparse step through the encoder (``E[id]`` rows where the ReLU is active,
  never the dense ``(N, P, K)`` Jacobian) and one backward over the segment below;
* contributions ``u ⊙ ∂y/∂u`` are scattered per concept: they sum to ``y``;
* **maps** and **cross-layer traces** — one chain of backward passes per (layer,
  rank) for the whole batch, seeded with the 0/1 selection of each image's rank-r
  concept; its first step yields the decomposition over the layer below, the
  rest the input map. No per-image or per-concept loop.
* **positional share** — a ViT adds its positional embedding ``pe`` to the tokens, an
  input-independent term no input map can hold: the last backward step also yields
  ``Σ pe ⊙ ∂/∂tokens``, reported in ``ExplanationMaps.positional`` so that
  ``Σ x ⊙ map + share`` is the mapped quantity exactly (None for B-cos CNNs).

Ranks are looped on the CPU, where a loop measured faster than vmap (``docs/BENCHMARKS.md``).
``batched_vjp=True`` (or the ``explain_vjp`` option, :mod:`fact_model.options`) instead
runs each layer's ``R`` rank passes as one batched VJP (``torch.func.vmap`` over the
backward): every layer's backward then runs once on ``R·N`` cotangents — the Triton
B-cos and decode kernels through their operators' vmap rules — fewer, larger launches
for a GPU. On CUDA the default (``auto``) times both once per shape and keeps the faster
(:data:`vjp_table`): the two compute the same numbers, only their speed differs by card,
model and batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from fact_model import options
from fact_model._validation import ClassSpec, resolve_classes
from fact_model.bcos.encoding import encode_rgb
from fact_model.explanation import (
    CrossLayerTrace,
    Explanation,
    ExplanationMaps,
    PositionalShares,
    SlotContributions,
    TopConcept,
    rank_classes,
)
from fact_model.model import FaCTModel, ForwardRecord
from fact_model.serialize import concept_share, positive_total
from kernels.path_table import PathTable, batch_bucket, eager_median_ms

__all__ = [
    "MAP_KINDS",
    "ContrastEqualsTargetError",
    "closed_form_applies",
    "closed_form_code_gradient",
    "closed_form_contributions",
    "concept_input_maps",
    "explain",
]

MAP_KINDS = ("concepts", "logit", "other")


@contextmanager
def _eval_mode(model: FaCTModel) -> Iterator[None]:
    """Eval mode inside the block: norm layers use running statistics, so images don't interact."""
    training = [m for m in model.modules() if m.training]
    for module in training:  # only the modules that need switching (a full eval() walk costs ~3 ms)
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


def closed_form_applies(model: FaCTModel) -> bool:
    """True when the last concept layer feeds the head directly and the head has a closed form.

    CNN heads: a plain 1×1 B-cos conv (stride 1, one group, no MaxOut). ViT heads (mean
    over tokens → centred layer norm → B-cos linear without MaxOut) have one too; see
    :meth:`~fact_model.backbones.vit.BcosViTBackbone.head_linearisation`. Otherwise
    :func:`explain` runs one backward pass from the logit instead.
    """
    if not model.concept_layers:
        return False
    return model.concept_layers[-1].name == model.backbone.stage_names[-1] and model.backbone.head_has_closed_form


def closed_form_code_gradient(model: FaCTModel, record: ForwardRecord, classes: Tensor) -> Tensor:
    """``∂y_c/∂u`` at the last concept layer's selected slots, in closed form.

    The head is linear in its input ``f̂`` once its input-dependent factors are detached,
    ``∂y_c/∂f̂_p = scale_{c,p} · direction_c`` (:meth:`StagedBackbone.head_linearisation`),
    and ``f̂_p = Σ_j u_{p,j} D[:, id_{p,j}]``, so ``∂y_c/∂u_{p,j} = scale_{c,p} (direction_c·D)[id_{p,j}]``.
    For a CNN's 1×1 B-cos head that is ``s_{c,p} (Ŵ_head D)[c, id_{p,j}] / (P·T)``; for a
    ViT's head ``s_c (Cent(γ⊙ŵ_c)·D)[id_{p,j}] / (σ·P·T)``, the same for every token.

    Args:
        classes: ``(N,)`` class per image.

    Returns:
        ``(N, P, k)``, detached.
    """
    layer_name = model.concept_layers[-1].name
    codes = record.codes[layer_name]
    decoder = model.concept_layer(layer_name).decoder
    with torch.no_grad():
        scale, direction = model.backbone.head_linearisation(record.head_input.detach(), classes)  # (N, P), (N, C)
        concept_weights = direction @ decoder.t()  # (N, K): direction_c · D (decoder holds Dᵀ)
        per_slot = concept_weights.gather(1, codes.indices.flatten(1)).view_as(codes.values)
        return scale[..., None] * per_slot


def closed_form_contributions(model: FaCTModel, record: ForwardRecord, classes: Tensor) -> Tensor:
    """``(N, K)`` contributions of the last concept layer's concepts to ``logit[classes] − b``, without a backward pass.

    ``u ⊙ ∂y/∂u`` with the closed-form gradient (:func:`closed_form_code_gradient`), scattered per
    concept; sums to ``scores.gather(1, classes)`` exactly. The prediction paths (the service's
    ``/predict`` and the exported ONNX graph) use this one function.

    Args:
        record: a forward pass's record (``FaCTModel.forward_encoded``).
        classes: ``(N,)`` class per image.
    """
    codes = record.codes[model.concept_layers[-1].name]
    return codes.scatter(codes.values * closed_form_code_gradient(model, record, classes))


class ContrastEqualsTargetError(ValueError):
    """A contrast class equal to the explained target (a caller's mistake, e.g. an HTTP 400).

    Attributes:
        images: the batch positions where the contrast equals the target, in order.
        contrast: the contrast class of the first of them.
    """

    def __init__(self, images: list[int], contrast: int, class_names: Sequence[str]) -> None:
        self.images, self.contrast = images, contrast
        super().__init__(self.message(class_names))

    def message(self, class_names: Sequence[str], positions: Sequence[int] | None = None) -> str:
        """The error message, naming ``positions[i]`` for batch position ``i`` (default: the positions themselves)."""
        first = self.images[0] if positions is None else positions[self.images[0]]
        more = f" (and {len(self.images) - 1} more image(s))" if len(self.images) > 1 else ""
        return (
            f"contrast class {class_names[self.contrast]!r} ({self.contrast}) equals the target class for image "
            f"{first}{more}: a contrast must be another class (why the target rather than it)"
        )


def _check_contrast(target: Tensor, contrast: Tensor | None, class_names: Sequence[str]) -> None:
    """Refuse a contrast equal to the target: ``logit[c] − logit[c]`` is 0, an all-zero "explanation".

    Args:
        target, contrast: ``(N,)`` class indices (``contrast`` may be None: no contrast).
    """
    if contrast is None:
        return
    same = (target.cpu() == contrast.cpu()).nonzero().flatten().tolist()
    if same:
        raise ContrastEqualsTargetError(same, int(contrast[same[0]]), class_names)


def _check_arguments(top_k: object, map_kinds: Sequence[str]) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
    unknown = [k for k in map_kinds if k not in MAP_KINDS]
    if unknown:
        raise ValueError(f"unknown map kinds {unknown}; valid: {list(MAP_KINDS)}")


vjp_table = PathTable(timer=eager_median_ms)
"""``FACT_EXPLAIN_VJP=auto`` on CUDA: ``loop`` or ``batched`` rank passes, the faster, measured once per key
(:func:`_faster_vjp_is_batched`)."""


class _StageClock:
    """Milliseconds of an explanation's stages: wall time on the CPU, GPU time (CUDA events) on CUDA.

    On CUDA the host runs ahead of the device, so wall time would credit the forward pass's kernels to
    whichever later step first waits for them. Events recorded on the stream measure the device's own
    time per stage; reading them waits once, for the last (the explanation is needed next anyway).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, stage: str) -> None:
        """The stage ``stage`` ends now."""
        self.marks.append((stage, self._now()))

    def stages_ms(self) -> dict[str, float]:
        """Stage → milliseconds since the previous mark, and ``total`` since the start."""
        end = self._now()
        if self.cuda:
            end.synchronize()

        def between(a: object, b: object) -> float:
            return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)  # type: ignore[attr-defined, operator]

        out = {stage: between(self.marks[i][1], t) for i, (stage, t) in enumerate(self.marks[1:])}
        return {**out, "total": between(self.marks[0][1], end)}


def _measures_vjp(x: Tensor) -> bool:
    """Whether ``auto`` times loop against batched rank passes here: on CUDA (on the CPU the loop always won)."""
    return x.is_cuda


def _faster_vjp_is_batched(
    model: FaCTModel, x: Tensor, backprop: _CodeBackprop, top_ids: dict[str, Tensor], map_layers: Sequence[str]
) -> bool:
    """Whether one batched VJP per layer beats the loop over ranks for this call's shape (timed at first sight).

    The key holds what the two paths' costs depend on: the model's architecture and concept
    layers, the input's shape (batch as its :func:`~kernels.path_table.batch_bucket`) and dtype,
    each layer's rank count (bucketed: ``top_k`` 5 and 6 share a choice), the mapped layers and
    the kernel mode. Timing runs both paths on this call's own graph (it is retained), so the
    first call of a key costs a few extra rank passes; the service's warm-up pays them.
    """
    key = (
        "explain_vjp",
        model.config.backbone,
        tuple((info.name, info.num_concepts, info.k) for info in model.concept_layers),
        batch_bucket(x.shape[0]),
        tuple(x.shape[1:]),
        x.dtype,
        tuple((name, batch_bucket(ids.shape[1])) for name, ids in top_ids.items()),
        tuple(map_layers),
        options.current().kernels,
    )
    candidates = {
        "loop": lambda: backprop.rank_passes(top_ids, map_layers, False),
        "batched": lambda: backprop.rank_passes(top_ids, map_layers, True),
    }
    return vjp_table.choose(key, candidates) == "batched"


def explain(
    model: FaCTModel,
    images: Tensor,
    target: ClassSpec = None,
    contrast: ClassSpec = None,
    top_k: int = 5,
    maps: bool = False,
    map_kinds: Sequence[str] = MAP_KINDS,
    map_layers: Sequence[str] | None = None,
    batched_vjp: bool | None = None,
    code_scales: Mapping[str, Tensor] | None = None,
) -> Explanation:
    """Explain a batch of images exactly, concept by concept.

    Args:
        model: the FaCT model (put in eval mode for the call).
        images: ``(N, 3, H, W)`` floating-point RGB in [0, 1] (``model.preprocess``).
        target: class to explain: None (the predicted class, ``rank_classes(scores)[:, 0]``),
            an index, a name, or one per image.
        contrast: optional class to contrast with: explains ``logit[target] −
            logit[contrast]`` ("why target rather than contrast"); must differ from the
            target in every image.
        top_k: concepts per layer reported in ``top_concepts`` and mapped (0 = none); a
            layer with ``K < top_k`` concepts reports all ``K`` (``R = min(top_k, K)`` per layer).
        maps: compute input-level maps (``Explanation.maps``).
        map_kinds: which maps: ``"concepts"`` (top concepts' activation maps),
            ``"logit"`` (the whole explained logit), ``"other"`` (all concepts but
            the shown ones).
        map_layers: concept layers whose top concepts get input maps (default: all);
            each mapped layer costs ``top_k`` backward passes.
        batched_vjp: run each layer's ``top_k`` rank passes as one batched VJP instead
            of a loop (same results); None follows ``fact_model.options.current().explain_vjp``
            (``FACT_EXPLAIN_VJP``: ``auto``, the default — a loop on the CPU, the faster of the
            two on CUDA, measured once per shape —, ``loop`` or ``batched``).
        code_scales: explain an intervened network: layer → ``(N, K)`` factors multiplying each
            concept's codes (:meth:`FaCTModel.forward_encoded`; see :mod:`fact_model.intervention`).
            The explanation is exact for the edited network: its contributions sum to its logit.

    Raises:
        ValueError: bad images (rank, channels, dtype, NaN/inf, range, empty), a
            class out of range or unknown, a contrast equal to the target of an image, a
            bad ``top_k``/``map_kinds``, or a model without concept layers.
    """
    _check_arguments(top_k, map_kinds)
    if batched_vjp is None and options.current().explain_vjp != "auto":
        batched_vjp = options.current().explain_vjp == "batched"
    layer_names, mapped = _mapped_layers(model, map_layers)
    clock = _StageClock(model.device)
    x = model.validate_images(images)
    n = x.shape[0]
    target_idx = resolve_classes(target, n, model.class_names, "target")
    contrast_idx = resolve_classes(contrast, n, model.class_names, "contrast")
    if target_idx is not None:  # known before the forward pass: refuse early
        _check_contrast(target_idx, contrast_idx, model.class_names)
    closed_form = closed_form_applies(model)
    needs_graph = maps or len(layer_names) > 1 or not closed_form
    record, x6 = _record_forward(model, x, maps, needs_graph, code_scales)
    clock.mark("forward")
    logits, scores = record.logits.detach(), record.scores.detach()
    ranking = rank_classes(scores)
    target_idx, contrast_idx, explained = _explained_quantity(scores, ranking, target_idx, contrast_idx, model)

    backprop = _CodeBackprop(model, record, x6 if maps else None)
    codes = record.codes
    code_grads = backprop.code_gradients(target_idx, contrast_idx, closed_form)
    slot_contributions = {name: codes[name].values.detach() * code_grads[name] for name in layer_names}
    contributions = {name: codes[name].scatter(slot_contributions[name]) for name in layer_names}
    activations = {name: codes[name].totals().detach() for name in layer_names}
    top_ids = {name: _top_ids(contributions[name], top_k) for name in layer_names}
    spatial = {name: codes[name].per_position(slot_contributions[name], top_ids[name]) for name in layer_names}
    slots = {
        name: SlotContributions(slot_contributions[name], codes[name].indices, codes[name].spatial_shape)
        for name in layer_names
    }
    concept_map_layers = mapped if maps and "concepts" in map_kinds else ()
    if batched_vjp is None:  # auto
        batched_vjp = _measures_vjp(x) and _faster_vjp_is_batched(model, x, backprop, top_ids, concept_map_layers)
    traces, concept_maps, concept_shares = backprop.rank_passes(top_ids, concept_map_layers, batched_vjp)
    explanation_maps = None
    if maps:
        explanation_maps = _whole_logit_maps(backprop, code_grads, top_ids, map_kinds, concept_maps, concept_shares)
    clock.mark("backward")

    # In float32 whatever the model's dtype: a bfloat16 sum would round its own residual away.
    residuals = {name: (contributions[name].float().sum(dim=1) - explained.float()).abs() for name in layer_names}
    return Explanation(
        logits=logits,
        probabilities=model.probabilities(logits),
        ranking=ranking,
        target=target_idx,
        contrast=contrast_idx,
        logit_bias=model.logit_bias,
        explained=explained,
        contributions=contributions,
        activations=activations,
        residuals=residuals,
        residual=torch.stack(list(residuals.values())).amax(dim=0),
        top_ids=top_ids,
        top_concepts=_top_concept_lists(layer_names, contributions, activations, top_ids),
        other_contribution={
            name: explained - contributions[name].gather(1, top_ids[name]).sum(dim=1) for name in layer_names
        },
        spatial=spatial,
        slots=slots,
        traces=traces,
        maps=explanation_maps,
        layer_names=layer_names,
        timings_ms=clock.stages_ms(),
    )


def _mapped_layers(model: FaCTModel, map_layers: Sequence[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(all concept layers in forward order, the layers whose top concepts get input maps)``; checks both."""
    if not model.concept_layers:
        raise ValueError("the model has no concept layers to explain with")
    layer_names = tuple(info.name for info in model.concept_layers)
    mapped = layer_names if map_layers is None else tuple(map_layers)
    unknown = [name for name in mapped if name not in layer_names]
    if unknown:
        raise ValueError(f"unknown concept layer(s) {unknown} in map_layers; concept layers: {list(layer_names)}")
    return layer_names, mapped


def _record_forward(
    model: FaCTModel, x: Tensor, maps: bool, needs_graph: bool, code_scales: Mapping[str, Tensor] | None = None
) -> tuple[ForwardRecord, Tensor]:
    """One forward pass in explanation mode: ``(record, x6)`` with ``x6 (N, 6, H, W)`` the encoded input.

    ``needs_graph``: keep the autograd graph (cut at every concept layer's codes) for backward
    passes; ``maps``: also differentiate with respect to ``x6``; ``code_scales``: an intervention.
    """
    # Mode switches (eval, explanation mode) are flags on shared modules: hold the model's
    # lock while they are set, so concurrent explain() calls cannot undo each other's
    # flags mid-forward. The backward passes depend only on the recorded graph.
    with model.mode_lock, _eval_mode(model), model.explanation_mode():
        with torch.enable_grad() if needs_graph else torch.no_grad():
            x6 = encode_rgb(x)
            if maps:
                x6.requires_grad_(True)
            record = model.forward_encoded(x6, code_leaves=needs_graph, code_scales=code_scales)
    return record, x6


def _explained_quantity(
    scores: Tensor, ranking: Tensor, target: Tensor | None, contrast: Tensor | None, model: FaCTModel
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(target (N,), contrast (N,) or None, y (N,))``: the default target is the prediction ``ranking[:, 0]``.

    ``y = scores[target]`` (``logit − b``), minus ``scores[contrast]`` with a contrast.
    """
    device = scores.device
    if contrast is not None:
        contrast = contrast.to(device)
    if target is None:
        target = ranking[:, 0]
        _check_contrast(target, contrast, model.class_names)
    else:
        target = target.to(device)
    explained = scores.gather(1, target[:, None]).squeeze(1)
    if contrast is not None:
        explained = explained - scores.gather(1, contrast[:, None]).squeeze(1)
    return target, contrast, explained


def _whole_logit_maps(
    backprop: _CodeBackprop,
    code_grads: dict[str, Tensor],
    top_ids: dict[str, Tensor],
    map_kinds: Sequence[str],
    concept_maps: dict[str, Tensor],
    concept_shares: dict[str, Tensor],
) -> ExplanationMaps:
    """The input maps of the explained logit and of "all other concepts", joined with the concept maps."""
    names = backprop.names
    logit_map = other_map = logit_share = other_share = None
    if "logit" in map_kinds:
        logit_map, logit_share = backprop.to_input(0, code_grads[names[0]])
    if "other" in map_kinds:
        top = backprop.record.codes[names[-1]]
        shown = top.select(top_ids[names[-1]]).sum(dim=1).clamp(max=1)
        other_map, other_share = backprop.to_input(len(names) - 1, code_grads[names[-1]] * (1 - shown))
    positional = None
    if backprop.offset is not None:
        positional = PositionalShares(concept_shares, logit_share, other_share)
    return ExplanationMaps(backprop.x6.detach(), concept_maps, logit_map, other_map, positional)


def _top_ids(contributions: Tensor, top_k: int) -> Tensor:
    """``(N, K)`` contributions → ``(N, min(top_k, K))`` concept ids, largest contribution first."""
    return contributions.topk(min(top_k, contributions.shape[1]), dim=1).indices


def concept_input_maps(
    model: FaCTModel, images: Tensor, layer: str, concept_ids: Tensor, *, return_positional: bool = False
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor | None]:
    """Input maps ``∂(Σ_p u_{k,p})/∂x`` of given concepts (not necessarily the top ones).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        layer: concept layer name.
        concept_ids: ``(N, R)`` concept ids per image.
        return_positional: also return the positional embedding's share ``(N, R)`` of each
            activation (None for a bias-free CNN; see :class:`~fact_model.explanation.PositionalShares`).

    Returns:
        ``(maps (N, R, 6, H, W), x6 (N, 6, H, W))`` [``, positional``]; ``(x6 ⊙ map).sum``
        over channels and pixels equals the concept's activation (minus the positional
        share for a ViT).
    """
    names = tuple(info.name for info in model.concept_layers)
    if layer not in names:
        raise ValueError(f"no concept layer {layer!r}; concept layers: {list(names)}")
    x = model.validate_images(images)
    with model.mode_lock, _eval_mode(model), model.explanation_mode(), torch.enable_grad():
        x6 = encode_rgb(x).requires_grad_(True)
        record = model.forward_encoded(x6, code_leaves=True)
    backprop = _CodeBackprop(model, record, x6)
    codes = record.codes[layer]
    selection = codes.select(concept_ids.to(codes.indices.device))
    index = names.index(layer)
    per_rank = [backprop.to_input(index, selection[:, r]) for r in range(concept_ids.shape[1])]
    maps = torch.stack([m for m, _ in per_rank], dim=1)
    if not return_positional:
        return maps, x6.detach()
    positional = None if backprop.offset is None else torch.stack([p for _, p in per_rank], dim=1)
    return maps, x6.detach(), positional


class _CodeBackprop:
    """Vector–Jacobian products over a forward recorded with ``code_leaves=True``.

    The autograd graph is cut at every concept layer's codes, so the network falls
    into segments: input → f₀, û₀ → f₁, …. A seed on layer i's codes is stepped
    into its features with the sparse :meth:`ConceptLayer.encoder_vjp`, then one
    backward over the segment below carries it to layer i−1's codes (or to the
    input). Each call covers the whole batch.

    When the backbone adds an input-independent term after its first stage (a ViT's
    positional embedding ``pe``), the last step also differentiates the first stage's
    output ``t`` and reports ``Σ pe ⊙ ∂/∂t``, the share no input map contains.
    """

    def __init__(self, model: FaCTModel, record: ForwardRecord, x6: Tensor | None) -> None:
        self.model = model
        self.record = record
        self.x6 = x6
        self.names = tuple(info.name for info in model.concept_layers)
        self.offset: Tensor | None = None  # (1, C, h, w), with x6 only: it matters for input maps
        if x6 is not None and record.first_output is not None:
            self.offset = model.backbone.input_offset(record.first_output.detach())

    def _segment_vjp(self, i: int, seed: Tensor, below: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Seed on layer i's codes → gradients on ``below`` (one backward over segment i, batched for a leading R)."""
        name = self.names[i]
        codes = self.record.codes[name]
        feature_seed = self.model.concept_layer(name).encoder_vjp(codes, seed)
        features = self.record.features[name]

        def vjp(cotangent: Tensor) -> tuple[Tensor, ...]:
            return torch.autograd.grad(features, below, cotangent, retain_graph=True)

        if seed.dim() == codes.values.dim() + 1:
            return torch.func.vmap(vjp)(feature_seed)
        return vjp(feature_seed)

    def step_down(self, i: int, seed: Tensor) -> Tensor:
        """Seed ``(N, P, k)`` on layer i ≥ 1's codes → gradient on layer i−1's codes.

        A seed ``(R, N, P, k)`` is R seeds at once: one batched VJP (``vmap`` over the
        backward) gives ``(R, …)``.
        """
        return self._segment_vjp(i, seed, (self.record.codes[self.names[i - 1]].values,))[0]

    def to_input(self, i: int, seed: Tensor) -> tuple[Tensor, Tensor | None]:
        """Seed on layer i's codes → ``(N, 6, H, W)`` gradient on the encoded input, and the offset's share.

        The share is ``(N,)`` (``(R, N)`` for R seeds), or None when the backbone adds no
        input-independent term.
        """
        for j in range(i, 0, -1):
            seed = self.step_down(j, seed)
        if self.offset is None:
            return self._segment_vjp(0, seed, (self.x6,))[0], None
        grad_x, grad_first = self._segment_vjp(0, seed, (self.x6, self.record.first_output))
        return grad_x, (self.offset * grad_first).sum(dim=(-3, -2, -1))

    def code_gradients(self, target: Tensor, contrast: Tensor | None, closed_form: bool) -> dict[str, Tensor]:
        """``∂y/∂u`` at every concept layer's code slots: layer → ``(N, P, k)``, detached."""
        top = self.names[-1]
        if closed_form:
            grad = closed_form_code_gradient(self.model, self.record, target)
            if contrast is not None:
                grad = grad - closed_form_code_gradient(self.model, self.record, contrast)
        else:
            scores = self.record.scores
            y = scores.gather(1, target[:, None]).sum()
            if contrast is not None:
                y = y - scores.gather(1, contrast[:, None]).sum()
            (grad,) = torch.autograd.grad(y, self.record.codes[top].values, retain_graph=True)
        grads = {top: grad}
        for i in range(len(self.names) - 1, 0, -1):
            grad = self.step_down(i, grad)
            grads[self.names[i - 1]] = grad
        return grads

    def rank_passes(
        self, top_ids: dict[str, Tensor], map_layers: Sequence[str], batched: bool = False
    ) -> tuple[list[CrossLayerTrace], dict[str, Tensor], dict[str, Tensor]]:
        """Per (layer, rank): the rank-r concept's cross-layer trace and, for ``map_layers``, its input map.

        ``top_ids``: layer → ``(N, R_layer)``; each layer runs its own ``R_layer`` ranks.
        The seed is the 0/1 selection of each image's rank-r concept in the layer's
        codes; its first step down yields the decomposition over the layer below (the
        trace), the remaining steps the input map. ``batched``: all ranks of a layer
        in one batched VJP per step instead of a loop over ranks.

        Returns the traces, the maps (layer → ``(N, R, 6, H, W)``) and, when the backbone
        adds an input-independent term, its shares (layer → ``(N, R)``; else empty).
        """
        traces: list[CrossLayerTrace] = []
        concept_maps: dict[str, Tensor] = {}
        shares: dict[str, Tensor] = {}
        for i, name in enumerate(self.names):
            with_maps = name in map_layers
            r = top_ids[name].shape[1]
            if r == 0 or (i == 0 and not with_maps):
                continue
            selection = self.record.codes[name].select(top_ids[name])  # (N, R, P, k)
            seeds = [selection.movedim(1, 0)] if batched else [selection[:, rank] for rank in range(r)]
            maps_r, shares_r, trace_r = [], [], []
            for seed in seeds:
                grad = seed
                if i > 0:
                    grad = self.step_down(i, seed)
                    lower = self.record.codes[self.names[i - 1]]
                    per_rank = grad if batched else grad[None]
                    trace_r.extend(lower.scatter(lower.values.detach() * g) for g in per_rank)
                if with_maps:
                    input_grad, share = self.to_input(i - 1, grad) if i > 0 else self.to_input(0, seed)
                    maps_r.extend(input_grad if batched else [input_grad])
                    if share is not None:
                        shares_r.extend(share if batched else [share])
            if with_maps:
                concept_maps[name] = torch.stack(maps_r, dim=1)
                if shares_r:
                    shares[name] = torch.stack(shares_r, dim=1)
            if i > 0:
                traces.append(CrossLayerTrace(name, self.names[i - 1], top_ids[name], torch.stack(trace_r, dim=1)))
        return traces, concept_maps, shares


def _top_concept_lists(
    layer_names: tuple[str, ...],
    contributions: dict[str, Tensor],
    activations: dict[str, Tensor],
    top_ids: dict[str, Tensor],
) -> list[list[TopConcept]]:
    """Per image: the top concepts of every layer, last layer first (plain Python floats).

    Shares follow the serialiser's rule (:func:`fact_model.serialize.concept_share`), so a
    ``TopConcept.share`` equals the ``share`` of the same concept in a JSON record.
    """
    n = next(iter(contributions.values())).shape[0]
    per_image: list[list[TopConcept]] = [[] for _ in range(n)]
    for name in reversed(layer_names):
        ids = top_ids[name]
        contrib = contributions[name].gather(1, ids).tolist()
        act = activations[name].gather(1, ids).tolist()
        for img, concept_ids in enumerate(ids.tolist()):
            positive = positive_total(contributions[name][img])
            per_image[img].extend(
                TopConcept(name, cid, c, concept_share(c, positive), a)
                for cid, c, a in zip(concept_ids, contrib[img], act[img], strict=True)
            )
    return per_image
