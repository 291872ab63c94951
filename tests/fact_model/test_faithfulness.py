"""fact faithfulness: each metric on hand-computed cases, the methods' completeness, a small run of the command."""

from __future__ import annotations

import json

import pytest
import torch

from fact_model.analysis import attribution_metrics as metrics
from fact_model.analysis.faithfulness import METHODS, attribute, ig_convergence_delta
from tests.conftest import make_model


def _linear_score(weights: torch.Tensor):
    """``score(x) = Σ_pixels w · x`` summed over channels: a model for which everything is known in closed form."""

    def score(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (images.sum(dim=1) * weights).flatten(1).sum(dim=1)

    return score


def test_completeness_error_is_relative_to_the_explained_score():
    attributions = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.5], [0.0, 0.0]]])
    got = metrics.completeness_error(attributions, torch.tensor([10.0, 2.0]))
    assert got.tolist() == pytest.approx([0.0, 0.5])


def test_deletion_and_insertion_curves_of_a_linear_score_in_closed_form():
    """One image of 4 pixels, value 1 in every channel, weights (4, 3, 2, 1): with exact attributions ``w·x``
    deletion (most relevant first) removes 12, 9, 6, 3 in turn; insertion adds them in the same order."""
    weights = torch.tensor([[4.0, 3.0], [2.0, 1.0]])
    images = torch.ones(1, 3, 2, 2) / 3  # channel sum 1 per pixel
    targets = torch.zeros(1, dtype=torch.long)
    exact = weights[None] * images.sum(dim=1)
    score = _linear_score(weights)
    deletion = metrics.perturbation_curves(score, images, targets, exact, steps=4)
    insertion = metrics.perturbation_curves(score, images, targets, exact, steps=4, insert=True)
    lerf = metrics.perturbation_curves(score, images, targets, exact, steps=4, most_relevant_first=False)
    assert deletion[0].tolist() == pytest.approx([10, 6, 3, 1, 0])
    assert insertion[0].tolist() == pytest.approx([0, 4, 7, 9, 10])
    assert lerf[0].tolist() == pytest.approx([10, 9, 7, 4, 0])
    # trapezoid over 4 equal steps of 1/4
    assert metrics.curve_auc(deletion).item() == pytest.approx((10 / 2 + 6 + 3 + 1 + 0 / 2) / 4)
    assert metrics.curve_auc(insertion).item() == pytest.approx((0 + 4 + 7 + 9 + 10 / 2) / 4)
    assert metrics.curve_auc(lerf).item() == pytest.approx(metrics.curve_auc(insertion).item())  # mirror images
    # the worst order (least relevant first as "MoRF") gives a larger deletion AUC
    worse = metrics.perturbation_curves(score, images, targets, -exact, steps=4)
    assert metrics.curve_auc(worse).item() > metrics.curve_auc(deletion).item()


def test_curves_refuse_mismatched_attributions():
    with pytest.raises(ValueError, match=r"attributions must have shape \(1, 2, 2\), got \(1, 3, 3\)"):
        metrics.perturbation_curves(
            _linear_score(torch.ones(2, 2)), torch.ones(1, 3, 2, 2), torch.zeros(1), torch.ones(1, 3, 3)
        )


def test_region_shares_split_positive_attribution_by_label():
    attributions = torch.tensor([[[2.0, -5.0], [1.0, 1.0]]])
    regions = torch.tensor([[[1, 1], [2, 0]]])  # part 1 decides the class, part 2 is a distractor
    shares = metrics.region_shares(attributions, regions, [[1]])
    assert {k: v.item() for k, v in shares.items()} == pytest.approx(
        {"parts": 0.5, "distractors": 0.25, "background": 0.25}
    )


def test_grid_mosaics_hold_four_classes_and_quadrant_shares_find_them():
    images = torch.stack([torch.full((3, 8, 8), c / 10) for c in range(5) for _ in range(2)])
    labels = torch.arange(5).repeat_interleave(2)
    mosaics, classes = metrics.grid_mosaics(images, labels, 3)
    assert mosaics.shape == (3, 3, 8, 8) and classes.shape == (3, 4)
    assert all(len(set(row)) == 4 for row in classes.tolist())
    for m, row in zip(mosaics, classes.tolist(), strict=True):  # each quadrant is its class's image
        assert torch.allclose(m[:, :4, :4], torch.full((3, 4, 4), row[0] / 10))
        assert torch.allclose(m[:, 4:, 4:], torch.full((3, 4, 4), row[3] / 10))
    maps = torch.zeros(4, 8, 8)
    maps[0, :4, :4], maps[1, :4, 4:], maps[2, 4:, :4], maps[3] = 1.0, 1.0, 1.0, 1.0
    assert metrics.quadrant_shares(maps, torch.tensor([0, 1, 2, 3])).tolist() == pytest.approx([1, 1, 1, 0.25])
    few = metrics.grid_mosaics(images[:6], labels[:6], 2)[0]
    assert few.shape[0] == 0  # three classes cannot fill a mosaic


@pytest.fixture(scope="module")
def model_and_images():
    model = make_model([("layer2", 16, 2), ("layer3", 24, 4)])
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    return model, images, targets


def test_fact_is_complete_and_ig_matches_captums_convergence_delta(model_and_images):
    model, images, targets = model_and_images
    with torch.no_grad():
        logits = model(images)
        black = model(torch.zeros_like(images))
    explained = logits.gather(1, targets[:, None]).squeeze(1) - model.logit_bias
    fact = attribute(model, "fact", images, targets)
    assert fact.shape == (3, 32, 32)
    assert metrics.completeness_error(fact, explained).max() <= 1e-4
    ig, delta = ig_convergence_delta(model, images, targets, steps=15)
    # Σ IG = f(x) − f(black) + δ, so its error against logit − b is Captum's delta plus f(black) − b
    f_black = black.gather(1, targets[:, None]).squeeze(1) - model.logit_bias
    gap = ig.flatten(1).sum(dim=1) - explained
    torch.testing.assert_close(gap, delta.float() - f_black, rtol=1e-4, atol=1e-5)
    assert torch.equal(attribute(model, "ig15", images, targets), ig)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("fact", "ig50")])
def test_every_method_gives_one_finite_map_per_image(model_and_images, method):
    model, images, targets = model_and_images
    maps = attribute(model, method, images, targets)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    if method == "grad_cam":
        assert (maps >= 0).all()  # ReLU'd class activation map


def test_unknown_method_is_refused():
    model = make_model([("layer3", 24, 4)])
    with pytest.raises(ValueError, match=r"unknown method 'lrp'; methods: \['fact', 'ig15'"):
        attribute(model, "lrp", torch.rand(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))


@pytest.mark.slow  # the default model through every method, the grid game and the timings
def test_the_command_writes_json_markdown_and_curves(tmp_path):
    from PIL import Image

    from fact_model.cli import FAITHFULNESS_METHODS, main

    assert FAITHFULNESS_METHODS == METHODS
    out = tmp_path / "faith"
    args = ["-q", "faithfulness", "--n", "8", "--steps", "4", "--timing-repeats", "1", "--out", str(out)]
    assert main([*args, "--methods", "fact,ig15,grad_cam,occlusion,random"]) == 0
    report = json.loads((out / "faithfulness.json").read_text())
    assert list(report["methods"]) == ["fact", "ig15", "grad_cam", "occlusion", "random"]
    fact, random = report["methods"]["fact"], report["methods"]["random"]
    assert fact["completeness_error_max"] <= 1e-4
    expected = {"deletion_morf_auc", "insertion_auc", "share_parts", "grid_pointing", "ms_per_image_b1"}
    assert expected <= set(fact)
    assert fact["share_parts"] > random["share_parts"]  # the shipped model looks at the parts
    assert abs(sum(fact[f"share_{k}"] for k in ("parts", "distractors", "background")) - 1) < 1e-5
    assert report["settings"]["fact_full_explanation_ms_per_image_b1"] > 0
    assert set(report["concept_removal"]) == {"concepts", "channels"}
    assert "| 5 concepts |" in (out / "faithfulness.md").read_text()
    assert "| fact |" in (out / "faithfulness.md").read_text()
    assert Image.open(out / "faithfulness_curves.png").size[0] > 500
    assert main([*args, "--methods", "fact,lrp"]) == 2  # refused with a message


def test_concept_removal_is_predicted_exactly_when_the_head_is_linear():
    """With B = 1 every B-cos layer is linear, so removing units drops the score by exactly their contributions;
    with B = 2 the head's dynamic scale reacts to the removal and the two differ."""
    from fact_model.analysis.faithfulness import concept_removal

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for b, exact in ((1.0, True), (2.0, False)):
        model = make_model([("layer3", 24, 4)], b=b)
        with torch.no_grad():
            targets = model(images).argmax(dim=1)
        result = concept_removal(model, images, targets, counts=(1, 3))
        assert set(result) == {"concepts", "channels"} and set(result["concepts"]) == {"1", "3"}
        for unit in ("concepts", "channels"):
            for figures in result[unit].values():
                assert figures["predicted_drop"] != 0
                assert figures["relative_error_median"] <= figures["relative_error_worst"]
                assert figures["relative_error"] <= figures["relative_error_worst"]
                if exact:
                    assert figures["relative_error_worst"] <= 1e-4, (unit, figures)
                    assert figures["measured_drop"] == pytest.approx(figures["predicted_drop"], rel=1e-4)
        if not exact:
            assert max(f["relative_error"] for f in result["concepts"].values()) > 1e-3
    assert concept_removal(make_model([("layer2", 16, 2)]), images, targets) is None  # not at the head


def test_concept_removal_reports_what_intervene_measures():
    """The concept half is :func:`intervene` with ``remove_top=n``: its figures are that intervention's."""
    from fact_model.analysis.faithfulness import concept_removal
    from fact_model.intervention import intervene

    model = make_model([("layer2", 16, 2), ("layer3", 24, 4)])
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    result = concept_removal(model, images, targets, counts=(2,))
    removal = intervene(model, images, remove_top=2, target=targets)
    predicted, measured = -removal.predicted_change, -removal.measured_change
    top2 = removal.before.contributions["layer3"].topk(2, dim=1).values.sum(dim=1)
    torch.testing.assert_close(predicted, top2)
    error = (measured - predicted).abs() / predicted.abs()
    assert result["concepts"]["2"] == pytest.approx(
        {
            "predicted_drop": float(predicted.mean()),
            "measured_drop": float(measured.mean()),
            "relative_error": float(error.mean()),
            "relative_error_median": float(error.median()),
            "relative_error_worst": float(error.max()),
        },
        rel=1e-5,
    )
