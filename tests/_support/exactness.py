"""Independent references the exactness tests compare explanations with (float64 copies, plain autograd)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from fact_model.bcos.encoding import encode_rgb
from tests.conftest import NUM_CLASSES, make_model

REL_TOL = 1e-4  # float32, relative to the size of the terms being summed
ONE_LAYER_LAST = [("layer3", 48, 4)]


def assert_sums_to(parts: torch.Tensor, total: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """``parts.sum(-1) == total`` to REL_TOL relative to ``scale`` (default ``Σ|parts|``)."""
    magnitude = parts.abs().sum(-1) if scale is None else scale
    error = (parts.sum(-1) - total).abs()
    assert (error <= REL_TOL * magnitude.clamp_min(1e-12)).all(), (
        f"residual {error.max():.3e} vs magnitude {magnitude.min():.3e}"
    )


def reference_scores(model, images) -> torch.Tensor:
    """``logit − b`` from an independent float64 copy of the model, as float32."""
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        return (double(images.double()) - model.logit_bias).float()


def logit_magnitude(model, images, *classes: torch.Tensor) -> torch.Tensor:
    """``Σ_p |head_{c,p}| / (P·T)`` summed over ``classes``: the size of the terms the forward pass adds up.

    A logit of a random-weight network is a sum of per-position terms that largely
    cancel, so float32 rounding is relative to these terms, not to the small sum.
    """
    with torch.no_grad():
        head = model.backbone.head(model.forward_encoded(encode_rgb(images)).head_input)  # (N, classes, h, w)
        per_class = head.abs().mean(dim=(2, 3)) / model.logit_temperature
    return sum(per_class.gather(1, c[:, None]).squeeze(1) for c in classes)


def autograd_contributions(model, images, target, layer):
    """Independent reference: ``u ⊙ ∂y/∂u`` by plain autograd in explanation mode, dense over K."""
    with model.explanation_mode():
        record = model.forward_encoded(encode_rgb(images))
        codes = record.codes[layer]
        y = record.logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(y, codes.values)
    dense = torch.zeros(images.shape[0], codes.num_concepts)
    flat_ids, flat = codes.indices.flatten(1), (codes.values * grad).flatten(1).detach()
    for n in range(images.shape[0]):
        for j in range(flat.shape[1]):
            dense[n, flat_ids[n, j]] += flat[n, j]
    return dense


def stable_ranking(scores: torch.Tensor) -> torch.Tensor:
    """Independent reference ranking: Python's sort on ``(−score, class index)`` per image."""
    rows = [sorted(range(len(row)), key=lambda c, row=row: (-row[c], c)) for row in scores.tolist()]
    return torch.tensor(rows)


def ranking_test_model(kind: str):
    """A model whose class order is ambiguous, for the one-ranking tests; ``(model, expected winner)``.

    ``"saturated"``: temperature 1e9 makes the scores ~1e-11, so every logit ``b + score``
    rounds to ``b`` in float32 (``argmax(logits)`` = 0), while the scores still put class 3
    first (head rows 0 and 3 swapped; seed 0 puts class 0 first, with a positive score,
    for the test images).
    ``"tied"``: classes 2 and 4 score exactly 0 (their head rows read only a feature channel
    the decoder never writes) and every other class −score₀ < 0: an exact tie on top,
    which the lower index (2) wins.
    """
    model = make_model(ONE_LAYER_LAST, logit_temperature=1e9 if kind == "saturated" else 1.0)
    weight = model.backbone.head.weight  # (classes, C, 1, 1)
    with torch.no_grad():
        rows = weight.clone()
        if kind == "saturated":
            weight[0], weight[3] = rows[3], rows[0]
            return model, 3
        model.concept_layer("layer3").decoder[:, 0] = 0.0  # decoded feature channel 0 is exactly 0
        weight.copy_(-rows[0].expand_as(weight))
        weight[[2, 4]] = 0.0
        weight[[2, 4], 0] = 1.0
    return model, 2


def check_completeness_for_every_class(
    model, images: torch.Tensor, magnitude: Callable[[torch.Tensor], torch.Tensor], atol: float
) -> list:
    """For every class: ``explained`` equals an independent float64 ``logit − b``, and every layer's
    contributions sum to it (relative to ``magnitude(target)`` or the logit itself). Returns the explanations.
    """
    scores = reference_scores(model, images)
    explanations = []
    for target in range(NUM_CLASSES):
        expl = model.explain(images, target=target)
        expected = scores[:, target]
        torch.testing.assert_close(expl.explained, expected, rtol=REL_TOL, atol=atol)
        scale = torch.maximum(expected.abs(), 1e-2 * magnitude(expl.target))
        for name in expl.layer_names:
            assert expl.contributions[name].shape == (images.shape[0], model.concept_layer(name).num_concepts)
            assert_sums_to(expl.contributions[name], expected, scale)
        assert (expl.residual <= REL_TOL * scale).all()
        explanations.append(expl)
    return explanations


def check_contrastive_completeness(
    model, images: torch.Tensor, magnitude: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> None:
    """Targets 0–3 against contrasts 5–2: every layer's contributions sum to the independent score difference."""
    scores = reference_scores(model, images)
    targets, contrasts = [0, 1, 2, 3], [5, 4, 3, 2]
    expl = model.explain(images, target=targets, contrast=contrasts)
    expected = scores[range(4), targets] - scores[range(4), contrasts]
    torch.testing.assert_close(expl.explained, expected, rtol=REL_TOL, atol=1e-6)
    scale = torch.maximum(expected.abs(), 1e-2 * magnitude(expl.target, expl.contrast))
    for name in expl.layer_names:
        assert_sums_to(expl.contributions[name], expected, scale)
