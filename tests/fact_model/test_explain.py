"""Exactness of FaCT explanations (spec sections 1 and 4), checked against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch

from fact_model import explain as explain_module
from fact_model.bcos.encoding import encode_rgb
from tests._support.exactness import (
    ONE_LAYER_LAST,
    REL_TOL,
    assert_sums_to,
    autograd_contributions,
    check_completeness_for_every_class,
    check_contrastive_completeness,
    logit_magnitude,
    ranking_test_model,
    reference_scores,
    stable_ranking,
)
from tests.conftest import NUM_CLASSES, make_model

ONE_LAYER_MIDDLE = [("layer2", 32, 4)]
TWO_LAYERS = [("layer2", 32, 4), ("layer3", 48, 4)]


@pytest.mark.parametrize("layers", [ONE_LAYER_LAST, ONE_LAYER_MIDDLE, TWO_LAYERS], ids=["last", "middle", "two"])
@pytest.mark.parametrize("seed", [0, 1])
def test_completeness_for_every_class(layers, seed, images):
    model = make_model(layers, seed=seed)
    check_completeness_for_every_class(model, images, lambda target: logit_magnitude(model, images, target), 1e-9)


@pytest.mark.parametrize("layers", [ONE_LAYER_LAST, TWO_LAYERS], ids=["last", "two"])
def test_contrastive_completeness(layers, images):
    model = make_model(layers)
    check_contrastive_completeness(model, images, lambda t, c: logit_magnitude(model, images, t, c))


def test_closed_form_equals_autograd(images):
    model = make_model(ONE_LAYER_LAST)
    assert explain_module.closed_form_applies(model)
    expl = model.explain(images)
    reference = autograd_contributions(model, images, expl.target, "layer3")
    scale = reference.abs().max()
    assert (expl.contributions["layer3"] - reference).abs().max() <= 1e-5 * scale


def test_closed_form_with_non_default_temperature_and_b(images):
    model = make_model(ONE_LAYER_LAST, logit_temperature=0.7, b=2.5)
    expl = model.explain(images)
    reference = autograd_contributions(model, images, expl.target, "layer3")
    assert (expl.contributions["layer3"] - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_middle_layer_uses_autograd_and_matches_reference(images):
    model = make_model(ONE_LAYER_MIDDLE)
    assert not explain_module.closed_form_applies(model)
    expl = model.explain(images, target=2)
    reference = autograd_contributions(model, images, expl.target, "layer2")
    assert (expl.contributions["layer2"] - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_input_maps_are_exact_decompositions(images):
    model = make_model(TWO_LAYERS)
    expl = model.explain(images, target=1, top_k=3, maps=True)
    maps = expl.maps
    assert maps is not None and maps.inputs.shape == (4, 6, 32, 32)
    for name in expl.layer_names:
        assert maps.concepts[name].shape == (4, 3, 6, 32, 32)
        pixel_sums = maps.pixel_contributions(maps.concepts[name]).flatten(2).sum(-1)
        activation = expl.activations[name].gather(1, expl.top_ids[name])
        torch.testing.assert_close(pixel_sums, activation, rtol=REL_TOL, atol=1e-6)
    torch.testing.assert_close(
        maps.pixel_contributions(maps.logit).sum((-1, -2)), expl.explained, rtol=REL_TOL, atol=1e-7
    )
    torch.testing.assert_close(
        maps.pixel_contributions(maps.other).sum((-1, -2)), expl.other_contribution["layer3"], rtol=REL_TOL, atol=1e-7
    )


def test_dynamic_linearity_of_whole_model_against_plain_autograd(images):
    """Σ_pixels x ⊙ ∂a/∂x = a, computed here without explain(), for a logit and a concept activation."""
    model = make_model(TWO_LAYERS)
    x6 = encode_rgb(images).requires_grad_(True)
    with model.explanation_mode():
        record = model.forward_encoded(x6)
        logit = record.logits[:, 3] - model.logit_bias
        (g_logit,) = torch.autograd.grad(logit.sum(), x6, retain_graph=True)
        activation = record.codes["layer2"].totals()[:, 7]
        (g_act,) = torch.autograd.grad(activation.sum(), x6)
    torch.testing.assert_close((x6 * g_logit).sum((1, 2, 3)), logit, rtol=REL_TOL, atol=1e-7)
    torch.testing.assert_close((x6 * g_act).sum((1, 2, 3)), activation, rtol=REL_TOL, atol=1e-6)


def test_cross_layer_traces_sum_to_upper_activation(images):
    model = make_model(TWO_LAYERS)
    expl = model.explain(images, top_k=4)
    (trace,) = expl.traces
    assert (trace.upper, trace.lower) == ("layer3", "layer2")
    assert trace.contributions.shape == (4, 4, 32)
    upper_activation = expl.activations["layer3"].gather(1, trace.upper_ids)
    assert_sums_to(trace.contributions, upper_activation)
    assert torch.equal(trace.upper_ids, expl.top_ids["layer3"])


def test_spatial_maps_sum_to_contributions(images):
    model = make_model(TWO_LAYERS)
    expl = model.explain(images, top_k=3)
    for name in expl.layer_names:
        spatial = expl.spatial[name]
        assert spatial.shape[:2] == (4, 3)
        torch.testing.assert_close(
            spatial.flatten(2).sum(-1), expl.contributions[name].gather(1, expl.top_ids[name]), rtol=1e-5, atol=1e-8
        )


def test_top_concepts_are_sorted_with_consistent_shares(images):
    model = make_model(TWO_LAYERS)
    expl = model.explain(images, top_k=5)
    for n, concepts in enumerate(expl.top_concepts):
        assert [c.layer for c in concepts] == ["layer3"] * 5 + ["layer2"] * 5
        top = concepts[:5]
        assert [c.contribution for c in top] == sorted((c.contribution for c in top), reverse=True)
        contrib = expl.contributions["layer3"][n]
        assert top[0].contribution == pytest.approx(contrib.max().item())
        assert top[0].share == pytest.approx(top[0].contribution / contrib.clamp(min=0).sum().item(), rel=1e-5)
        assert top[0].activation == pytest.approx(expl.activations["layer3"][n, top[0].concept].item())


def test_explanation_mode_changes_no_forward_value(images):
    model = make_model(TWO_LAYERS)
    with torch.no_grad():
        plain = model(images)
        with model.explanation_mode():
            detached = model(images)
    assert torch.equal(plain, detached)


def test_batch_images_are_independent(images):
    model = make_model(TWO_LAYERS)
    batch = model.explain(images, target=2)
    for n in range(images.shape[0]):
        single = model.explain(images[n : n + 1], target=2)
        torch.testing.assert_close(
            single.contributions["layer3"][0], batch.contributions["layer3"][n], rtol=1e-5, atol=1e-7
        )


def test_explain_leaves_inputs_and_mode_untouched(images):
    model = make_model(ONE_LAYER_LAST).train()
    before = images.clone()
    expl = model.explain(images, maps=True, top_k=2)
    assert torch.equal(images, before)
    assert model.training  # restored
    assert not any(getattr(m, "detach_dynamic", False) for m in model.modules())
    torch.testing.assert_close(expl.logits, model.eval()(images))  # explain used eval statistics


def test_default_target_is_prediction_and_names_work(images):
    model = make_model(ONE_LAYER_LAST)
    expl = model.explain(images)
    assert torch.equal(expl.target, expl.ranking[:, 0])
    assert torch.equal(expl.target, expl.logits.argmax(1))  # no ties here: the logits agree
    by_name = model.explain(images, target="class_4")
    assert (by_name.target == 4).all()
    torch.testing.assert_close(expl.probabilities.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "images_fn,kwargs,message",
    [
        (lambda x: x[:, :2], {}, "3 \\(RGB\\) channels"),
        (lambda x: encode_rgb(x), {}, "3 \\(RGB\\) channels"),
        (lambda x: (x * 255).to(torch.uint8), {}, "floating-point"),
        (lambda x: x.index_fill(0, torch.tensor([1]), float("nan")), {}, "NaN"),
        (lambda x: x.index_fill(0, torch.tensor([1]), float("inf")), {}, "NaN or infinite"),
        (lambda x: x[:0], {}, "empty batch"),
        (lambda x: x[0], {}, "unsqueeze"),
        (lambda x: x * 3, {}, "\\[0, 1\\]"),
        (lambda x: x.numpy(), {}, "torch.Tensor"),
        (lambda x: x, {"target": NUM_CLASSES}, "out of range"),
        (lambda x: x, {"target": -1}, "out of range"),
        (lambda x: x, {"contrast": 99}, "out of range"),
        (lambda x: x, {"target": "zebra"}, "unknown target class name 'zebra'"),
        (lambda x: x, {"target": [0, 1]}, "2 entries but the batch has 4"),
        (lambda x: x, {"target": 1.5}, "class index"),
        (lambda x: x, {"top_k": -1}, "top_k"),
        (lambda x: x, {"maps": True, "map_kinds": ("heat",)}, "unknown map kinds"),
    ],
)
def test_bad_input_raises_clear_value_error(images, images_fn, kwargs, message):
    model = make_model(ONE_LAYER_LAST)
    with pytest.raises(ValueError, match=message):
        model.explain(images_fn(images), **kwargs)


def test_model_without_concept_layers_is_refused(images):
    model = make_model([])
    with pytest.raises(ValueError, match="no concept layers"):
        model.explain(images)


def test_bad_concept_layer_position():
    with pytest.raises(ValueError, match="cannot insert a concept layer at 'layer9'.*layer3"):
        make_model([("layer9", 8, 2)])


def test_concurrent_explains_agree_with_sequential(images):
    """explain() switches flags on shared modules; threads must not undo each other's switches."""
    from concurrent.futures import ThreadPoolExecutor

    model = make_model(TWO_LAYERS)
    targets = [t % NUM_CLASSES for t in range(12)]
    sequential = [model.explain(images, target=t, maps=True, top_k=2) for t in targets]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda t: model.explain(images, target=t, maps=True, top_k=2), targets))
    for seq, con in zip(sequential, concurrent, strict=True):
        torch.testing.assert_close(con.contributions["layer2"], seq.contributions["layer2"])
        torch.testing.assert_close(con.maps.concepts["layer3"], seq.maps.concepts["layer3"])
    assert not any(getattr(m, "detach_dynamic", False) for m in model.modules())


def test_model_copies_get_their_own_lock():
    model = make_model(ONE_LAYER_LAST)
    clone = copy.deepcopy(model)
    assert clone.mode_lock is not model.mode_lock
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize(
    "backbone,layers",
    [
        ("bcos_v2_resnet50", [("layer4", 512, 16)]),
        ("bcos_v2_densenet121", [("features.transition3", 256, 8), ("features.norm5", 512, 16)]),
    ],
)
def test_imagenet_architectures_explain_exactly(backbone, layers):
    """The paper's placements on B-cos-v2 architectures (small images and dictionaries to stay fast)."""
    model = make_model(layers, backbone=backbone)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expl = model.explain(images, top_k=2, maps=True, map_kinds=("concepts", "logit"))
    expected = reference_scores(model, images).gather(1, expl.target[:, None]).squeeze(1)
    magnitude = torch.maximum(expected.abs(), 1e-2 * logit_magnitude(model, images, expl.target))
    for name, _, _ in layers:
        assert_sums_to(expl.contributions[name], expected, magnitude)
        pixel_sums = expl.maps.pixel_contributions(expl.maps.concepts[name]).flatten(2).sum(-1)
        activation = expl.activations[name].gather(1, expl.top_ids[name])
        torch.testing.assert_close(pixel_sums, activation, rtol=REL_TOL, atol=1e-5)
    for trace in expl.traces:
        assert_sums_to(trace.contributions, expl.activations[trace.upper].gather(1, trace.upper_ids))


def test_features_at_and_scores_from_split_the_forward_pass(images):
    model = make_model(TWO_LAYERS)
    x6 = encode_rgb(images)
    with torch.no_grad():
        full = model.forward_encoded(x6)
        for layer in ("layer1", "layer2", "layer3"):
            features = model.features_at(x6, layer)
            torch.testing.assert_close(model.scores_from(features, layer), full.scores, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.features_at(x6, "layer3"), full.features["layer3"])
    with pytest.raises(ValueError, match="unknown stage 'layer7'"):
        model.features_at(x6, "layer7")


def test_map_layers_restricts_maps_but_not_traces(images):
    model = make_model(TWO_LAYERS)
    full = model.explain(images, top_k=2, maps=True)
    top_only = model.explain(images, top_k=2, maps=True, map_layers=["layer3"])
    assert set(top_only.maps.concepts) == {"layer3"}
    torch.testing.assert_close(top_only.maps.concepts["layer3"], full.maps.concepts["layer3"])
    torch.testing.assert_close(top_only.traces[0].contributions, full.traces[0].contributions)
    assert set(top_only.timings_ms) == {"forward", "backward", "total"}
    with pytest.raises(ValueError, match="unknown concept layer"):
        model.explain(images, maps=True, map_layers=["layer9"])


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the reference decode's backward under vmap
def test_batched_vjp_gives_the_loops_maps_and_traces(images, use_options):
    """All ranks of a layer in one batched VJP (vmap over the backward) = one backward per rank."""
    model = make_model(TWO_LAYERS)
    loop = model.explain(images, top_k=3, maps=True, batched_vjp=False)
    batched = model.explain(images, top_k=3, maps=True, batched_vjp=True)
    for name, maps in loop.maps.concepts.items():
        assert maps.shape == batched.maps.concepts[name].shape == (images.shape[0], 3, 6, 32, 32)
        torch.testing.assert_close(batched.maps.concepts[name], maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batched.traces[0].contributions, loop.traces[0].contributions, rtol=1e-5, atol=1e-7)
    use_options(explain_vjp="batched")
    from_options = model.explain(images, top_k=3, maps=True)
    torch.testing.assert_close(from_options.maps.concepts["layer2"], batched.maps.concepts["layer2"])
    choices = r"\['auto', 'loop', 'batched'\]"
    with pytest.raises(ValueError, match=r"FACT_EXPLAIN_VJP \(explain_vjp\) must be one of " + choices):
        use_options(explain_vjp="vectorised")


@pytest.mark.parametrize("kind", ["saturated", "tied"])
def test_one_class_ranking_where_logits_tie(kind, images):
    model, winner = ranking_test_model(kind)
    with torch.no_grad():
        record = model.forward_encoded(encode_rgb(images))
    scores, logits = record.scores, record.logits
    if kind == "saturated":  # the premise: logits cannot tell the classes apart, the scores can
        assert (logits == logits[:, :1]).all() and (logits.argmax(1) == 0).all()
        assert (scores.argmax(1) == winner).all()
    else:
        assert (scores[:, [2, 4]] == 0).all() and (scores[:, [0, 1, 3, 5]] < 0).all()
    expected = stable_ranking(scores)
    assert (expected[:, 0] == winner).all()
    expl = model.explain(images)
    assert torch.equal(expl.ranking, expected)
    assert torch.equal(expl.target, expected[:, 0])
    torch.testing.assert_close(expl.explained, scores[:, winner], rtol=REL_TOL, atol=0.0)


def test_contrast_equal_to_target_is_refused(images):
    model = make_model(ONE_LAYER_LAST)
    with pytest.raises(ValueError, match=r"contrast class 'class_3' \(3\) equals the target class for image 0"):
        model.explain(images, target=3, contrast="class_3")
    with pytest.raises(ValueError, match=r"contrast class 'class_2' \(2\) equals the target class for image 2:"):
        model.explain(images, target=[0, 1, 2, 3], contrast=[1, 0, 2, 4])
    # a default target is the prediction: a contrast equal to it is refused after the forward pass
    predicted = model.explain(images).target
    contrast = [int(predicted[0]), (int(predicted[1]) + 1) % NUM_CLASSES, int(predicted[2]), int(predicted[3])]
    message = rf"contrast class 'class_{contrast[0]}' \({contrast[0]}\) equals the target class for image 0 \(and"
    with pytest.raises(ValueError, match=message):
        model.explain(images, contrast=contrast)
    different = [(int(p) + 1) % NUM_CLASSES for p in predicted]
    assert (model.explain(images, contrast=different).explained > 0).all()  # the prediction beats any other class


PER_LAYER_K = [("layer2", 16, 4), ("layer3", 64, 4)]


def test_top_k_is_capped_per_layer(images):
    model = make_model(PER_LAYER_K)
    expl = model.explain(images, top_k=20, maps=True)
    ranks = {"layer2": 16, "layer3": 20}
    for name, r in ranks.items():
        contributions = expl.contributions[name]
        assert expl.top_ids[name].shape == (4, r)
        assert expl.spatial[name].shape[:2] == (4, r)
        assert expl.maps.concepts[name].shape == (4, r, 6, 32, 32)
        # top_ids are the r largest contributions (independent: a full descending sort)
        reference = contributions.sort(dim=1, descending=True).values[:, :r]
        torch.testing.assert_close(contributions.gather(1, expl.top_ids[name]), reference, rtol=0, atol=0)
        torch.testing.assert_close(
            expl.other_contribution[name], expl.explained - reference.sum(1), rtol=REL_TOL, atol=1e-6
        )
        pixel_sums = expl.maps.pixel_contributions(expl.maps.concepts[name]).flatten(2).sum(-1)
        torch.testing.assert_close(
            pixel_sums, expl.activations[name].gather(1, expl.top_ids[name]), rtol=REL_TOL, atol=1e-6
        )
        torch.testing.assert_close(
            expl.spatial[name].flatten(2).sum(-1), contributions.gather(1, expl.top_ids[name]), rtol=1e-5, atol=1e-8
        )
    assert [sum(c.layer == name for c in expl.top_concepts[0]) for name in ("layer3", "layer2")] == [20, 16]
    (trace,) = expl.traces
    assert trace.contributions.shape == (4, 20, 16) and torch.equal(trace.upper_ids, expl.top_ids["layer3"])
    assert_sums_to(trace.contributions, expl.activations["layer3"].gather(1, trace.upper_ids))
    # The K=16 layer reports all its concepts: nothing is left over (float rounding aside).
    magnitude = expl.contributions["layer2"].abs().sum(1)
    assert (expl.other_contribution["layer2"].abs() <= REL_TOL * magnitude).all()
    assert (expl.other_contribution["layer3"].abs() > REL_TOL * expl.contributions["layer3"].abs().sum(1)).all()


def test_top_k_covering_every_concept_leaves_no_other_contribution(images):
    model = make_model(PER_LAYER_K)
    expl = model.explain(images, top_k=64, maps=True, map_kinds=("other",))
    assert {name: ids.shape[1] for name, ids in expl.top_ids.items()} == {"layer2": 16, "layer3": 64}
    for name in expl.layer_names:
        assert sorted(expl.top_ids[name][0].tolist()) == list(range(expl.top_ids[name].shape[1]))
        magnitude = expl.contributions[name].abs().sum(1)
        assert (expl.other_contribution[name].abs() <= REL_TOL * magnitude).all()
    assert expl.traces[0].contributions.shape == (4, 64, 16)
    other_pixels = expl.maps.pixel_contributions(expl.maps.other)
    assert other_pixels.abs().max() <= REL_TOL * expl.contributions["layer3"].abs().sum(1).max()
