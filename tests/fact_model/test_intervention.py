"""Concept interventions (fact_model.intervention), each checked against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch

import fact_model
from fact_model.bcos.encoding import encode_rgb
from fact_model.intervention import Intervention, intervene
from fact_model.serialize import MAX_LISTED_EDITS, explanation_record, intervention_record
from tests._support.exactness import REL_TOL, assert_sums_to
from tests.conftest import NUM_CLASSES, make_model

LAST = [("layer3", 24, 4)]
TWO = [("layer2", 16, 4), ("layer3", 24, 4)]
VIT = "bcos_vitc"  # dim 64, 4 blocks: a 32 px image is a 4 × 4 token grid (tests/fact_model/test_vit.py)
VIT_TWO = [("transformer.encoder_1", 16, 4), ("transformer.encoder_3", 24, 4)]


@pytest.fixture(scope="module")
def two_layer_model():
    return make_model(TWO)


def _model(kind: str):
    if kind == "vit":
        pytest.importorskip("bcos.models.vit")
        return make_model(VIT_TWO, backbone=VIT)
    return make_model(TWO)


def _edited_copy(model, layer: str, factors: dict[int, float]):
    """Independent reference: a deep copy whose decoder row k (concept k's direction, ``decoder`` = Dᵀ) is scaled."""
    edited = copy.deepcopy(model)
    with torch.no_grad():
        decoder = edited.concept_layer(layer).decoder
        for concept, factor in factors.items():
            decoder[concept] *= factor
    return edited


def _scores_from_zero_reconstruction(model, images, layer: str) -> torch.Tensor:
    """Independent reference: ``logit − b`` of the network continued by hand from a zero tensor at ``layer``."""
    with torch.no_grad():
        shape = model.forward_encoded(encode_rgb(images)).features[layer].shape
        h = torch.zeros(shape)
        stages = model.backbone.stages
        concept_layers = {info.name for info in model.concept_layers}
        start = [name for name, _ in stages].index(layer)
        for name, stage in stages[start + 1 :]:
            h = stage(h)
            if name in concept_layers:
                h = model.concept_layer(name)(h)
        return model.backbone.head_scores(h)


# ---------------------------------------------------------------------------- removal and scaling
@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_removing_every_concept_leaves_what_the_network_computes_from_zero(two_layer_model, images, layer):
    model = two_layer_model
    num_concepts = model.concept_layer(layer).num_concepts
    iv = model.intervene(images, layer=layer, remove=list(range(num_concepts)))
    expected = _scores_from_zero_reconstruction(model, images, layer)
    torch.testing.assert_close(iv.after.logits - model.logit_bias, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(iv.after.target, iv.before.target)  # the same class, even where the prediction moved
    assert torch.equal(iv.factors, torch.zeros(4, num_concepts))
    torch.testing.assert_close(iv.after.activations[layer], torch.zeros(4, num_concepts))
    predicted = -iv.before.contributions[layer].sum(dim=1)  # minus everything the layer contributed
    torch.testing.assert_close(iv.predicted_change, predicted)


def test_removing_concepts_that_contribute_nothing_changes_nothing(two_layer_model, images):
    model = two_layer_model
    before = model.explain(images)
    silent = (before.activations["layer3"] == 0).all(dim=0).nonzero().flatten().tolist()
    assert silent, "the test needs concepts inactive in every image"
    iv = model.intervene(images, remove=silent)
    assert torch.equal(iv.after.logits, before.logits)
    for name in model.concept_layers:
        torch.testing.assert_close(iv.after.contributions[name.name], before.contributions[name.name])
    assert torch.equal(iv.predicted_change, torch.zeros(4)) and torch.equal(iv.measured_change, torch.zeros(4))


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("layer_index", [-1, 0], ids=["last", "lower"])
@pytest.mark.parametrize(
    "edit",
    [{"remove": [0, 3, 7]}, {"scale": {1: 0.5, 2: 2.0, 5: -1.0}}, {"remove": [4], "scale": {6: 3.0}}],
    ids=["remove", "scale", "both"],
)
def test_intervention_equals_a_copy_with_its_decoder_edited_by_hand(kind, layer_index, edit, images):
    model = _model(kind)
    layer = model.concept_layers[layer_index].name
    factors = {c: 0.0 for c in edit.get("remove", [])} | edit.get("scale", {})
    iv = model.intervene(images, layer=layer, **edit)
    reference = _edited_copy(model, layer, factors)
    with torch.no_grad():
        logits = reference(images)
    scale = logits.abs().max()
    assert (iv.after.logits - logits).abs().max() <= 1e-5 * scale
    expected = reference.explain(images, target=iv.before.target)
    for info in model.concept_layers:
        got, want = iv.after.contributions[info.name], expected.contributions[info.name]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), info.name
    torch.testing.assert_close(iv.after.explained, expected.explained, rtol=1e-5, atol=1e-6 * float(scale))
    edited = torch.ones(model.concept_layer(layer).num_concepts)
    for concept, factor in factors.items():
        edited[concept] = factor
    assert torch.equal(iv.factors, edited.expand(4, -1))


def test_contrastive_intervention_equals_the_edited_copy(two_layer_model, images):
    model = two_layer_model
    iv = model.intervene(images, remove=[0, 1, 2], target=1, contrast=4)
    reference = _edited_copy(model, "layer3", {0: 0.0, 1: 0.0, 2: 0.0}).explain(images, target=1, contrast=4)
    assert iv.after.contrast.tolist() == [4] * 4 and iv.before.contrast.tolist() == [4] * 4
    torch.testing.assert_close(iv.after.explained, reference.explained, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(iv.measured_change, reference.explained - iv.before.explained, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
@pytest.mark.parametrize("edit", [{"remove_top": 2}, {"keep_top": 3}, {"scale": {0: -2.0, 9: 4.0}}])
def test_the_edited_explanation_is_complete(kind, edit, images):
    model = _model(kind)
    for info in model.concept_layers:
        iv = model.intervene(images, layer=info.name, **edit)
        for name in iv.after.layer_names:
            scale = torch.maximum(iv.after.explained.abs(), iv.after.contributions[name].abs().sum(-1))
            assert_sums_to(iv.after.contributions[name], iv.after.explained, scale)


def test_the_linear_prediction_is_exact_when_the_head_is_linear(images):
    """With B = 1 the head is linear: editing the last concept layer changes ``y`` by exactly Σ (s − 1)·contribution.
    With B = 2 the head's dynamic scale reacts to the edit, and the gap is what it adds."""
    for b, exact in ((1.0, True), (2.0, False)):
        model = make_model(LAST, b=b)
        for edit in ({"remove_top": 1}, {"remove_top": 3}, {"keep_top": 2}, {"scale": {0: 0.5, 3: -1.5, 8: 2.0}}):
            iv = model.intervene(images, **edit)
            assert (iv.predicted_change != 0).all(), edit
            relative = iv.gap.abs() / iv.predicted_change.abs()
            if exact:
                assert relative.max() <= REL_TOL, (edit, relative)
            else:
                assert relative.max() > 1e-3, (edit, relative)
            torch.testing.assert_close(iv.gap, iv.measured_change - iv.predicted_change)


def test_an_empty_edit_changes_nothing(two_layer_model, images):
    model = two_layer_model
    for edit in ({}, {"remove": []}, {"scale": {}}, {"scale": {2: 1.0}}):
        iv = model.intervene(images, **edit)
        assert torch.equal(iv.factors, torch.ones(4, 24))
        assert torch.equal(iv.after.logits, iv.before.logits), edit
        assert torch.equal(iv.predicted_change, torch.zeros(4)) and torch.equal(iv.measured_change, torch.zeros(4))


# ---------------------------------------------------------------------------- top-n choices
def _ids(factors: torch.Tensor, value: float) -> set[int]:
    return set((factors == value).nonzero().flatten().tolist())


@pytest.mark.parametrize("layer", ["layer2", "layer3"])
@pytest.mark.parametrize("n", [1, 3])
def test_remove_top_and_keep_top_pick_each_images_top_concepts(two_layer_model, images, layer, n):
    """Against Python's sort of each image's contributions; where contributions tie at the n-th place (inactive
    concepts contribute exactly 0) any of the tied ids is right, so the chosen values are compared."""
    model = two_layer_model
    targets = [0, 1, 2, 3]  # one class per image, so that the top concepts differ between images
    removed = model.intervene(images, layer=layer, remove_top=n, target=targets)
    kept = model.intervene(images, layer=layer, keep_top=n, target=targets)
    contributions = removed.before.contributions[layer]
    everything = set(range(contributions.shape[1]))
    chosen_sets = set()
    for img, row in enumerate(contributions.tolist()):
        top_values = sorted(row, reverse=True)[:n]
        chosen = _ids(removed.factors[img], 0.0)
        assert sorted((row[k] for k in chosen), reverse=True) == top_values
        assert _ids(removed.factors[img], 1.0) == everything - chosen
        assert _ids(kept.factors[img], 1.0) == chosen and _ids(kept.factors[img], 0.0) == everything - chosen
        torch.testing.assert_close(removed.predicted_change[img], -torch.tensor(top_values).sum())
        torch.testing.assert_close(
            kept.predicted_change[img], torch.tensor(top_values).sum() - contributions[img].sum()
        )
        chosen_sets.add(frozenset(chosen))
    assert len(chosen_sets) > 1  # the images differ: the choice is per image


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer": "layer9"}, r"unknown concept layer 'layer9'; concept layers: \['layer2', 'layer3'\]"),
        ({"remove": [24]}, r"remove: concept id 24 is out of range \[0, 24\) of layer 'layer3'"),
        ({"remove": [-1]}, r"remove: concept id -1 is out of range \[0, 24\)"),
        ({"layer": "layer2", "remove": [16]}, r"concept id 16 is out of range \[0, 16\) of layer 'layer2'"),
        ({"remove": [1, 2, 1]}, r"remove lists concept id\(s\) \[1\] more than once"),
        ({"remove": [True]}, r"remove must hold int concept ids in \[0, 24\) of layer 'layer3', got True \(bool\)"),
        ({"remove": [1.0]}, r"remove must hold int concept ids in \[0, 24\).*got 1.0 \(float\)"),
        ({"remove": 3}, r"remove must be a sequence of concept ids in \[0, 24\), got 3 \(e.g. remove=\[3\]\)"),
        ({"remove": "3"}, r"remove must be a sequence of concept ids in \[0, 24\), got '3'"),
        ({"remove": {3: 0.0}}, r"remove must be a sequence of concept ids in \[0, 24\), got \{3: 0.0\}"),
        ({"remove": torch.tensor(3)}, r"remove must be a sequence of concept ids .*got 3 \(e.g. remove=\[3\]\)"),
        ({"remove": torch.tensor([[1, 2]])}, r"remove must hold int concept ids in \[0, 24\).*got \[1, 2\] \(list\)"),
        ({"scale": {30: 0.5}}, r"scale: concept id 30 is out of range \[0, 24\)"),
        ({"scale": {"a": 0.5}}, r"scale must hold int concept ids in \[0, 24\).*got 'a' \(str\)"),
        ({"scale": {2: float("nan")}}, r"scale: the factor of concept 2 must be a finite float, got nan"),
        ({"scale": {2: float("inf")}}, r"the factor of concept 2 must be a finite float, got inf"),
        ({"scale": {2: True}}, r"the factor of concept 2 must be a finite float, got True"),
        ({"scale": {2: "0.5"}}, r"the factor of concept 2 must be a finite float, got '0.5'"),
        ({"scale": [(2, 0.5)]}, r"scale must be a mapping \{concept id: factor\}, got list"),
        ({"remove": [2], "scale": {2: 0.5, 3: 2.0}}, r"concept id\(s\) \[2\] are both removed and scaled"),
        ({"remove_top": 0}, r"remove_top must be an int in \[1, 24\] \(the concepts of layer 'layer3'\), got 0"),
        ({"remove_top": 25}, r"remove_top must be an int in \[1, 24\].*got 25"),
        ({"keep_top": 1.5}, r"keep_top must be an int in \[1, 24\].*got 1.5"),
        ({"keep_top": True}, r"keep_top must be an int in \[1, 24\].*got True"),
        ({"layer": "layer2", "keep_top": 17}, r"keep_top must be an int in \[1, 16\] \(the concepts of layer 'layer2'"),
        ({"remove_top": 1, "keep_top": 2}, r"remove_top \(1\) and keep_top \(2\) exclude each other"),
        (
            {"remove_top": 1, "remove": [2]},
            r"remove_top chooses the concepts per image; it cannot be combined with remove",
        ),
        ({"keep_top": 1, "remove": [], "scale": {}}, r"keep_top .* cannot be combined with remove, scale"),
    ],
)
def test_bad_edits_are_refused_with_the_value_and_the_valid_range(two_layer_model, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        intervene(two_layer_model, images, **kwargs)


def test_concept_ids_may_come_as_a_list_tuple_set_tensor_or_array(two_layer_model, images):
    import numpy as np

    expected = two_layer_model.intervene(images, remove=[2, 5]).factors
    for ids in ((2, 5), {5, 2}, torch.tensor([2, 5]), np.array([2, 5]), [np.int64(2), 5]):
        assert torch.equal(two_layer_model.intervene(images, remove=ids).factors, expected), ids


def test_explain_refusals_pass_through(two_layer_model, images):
    with pytest.raises(ValueError, match="contrast class 'class_2' \\(2\\) equals the target class"):
        two_layer_model.intervene(images, remove=[0], target=2, contrast=2)
    with pytest.raises(ValueError, match="no concept layers"):
        make_model([]).intervene(images)


# ---------------------------------------------------------------------------- API and record
def test_public_names_and_the_method_agree(two_layer_model, images):
    assert fact_model.intervene is intervene and fact_model.Intervention is Intervention
    by_method = two_layer_model.intervene(images, remove=[1, 2], target=3)
    by_function = intervene(two_layer_model, images, remove=[1, 2], target=3)
    assert by_method.layer == "layer3"
    assert torch.equal(by_method.after.logits, by_function.after.logits)
    assert by_method.after.maps is None and by_method.before.maps is None
    with_maps = two_layer_model.intervene(images, remove=[1, 2], target=3, maps=True, map_layers=["layer3"], top_k=2)
    assert with_maps.after.maps is not None and set(with_maps.after.maps.concepts) == {"layer3"}
    assert with_maps.before.maps is None


def test_intervention_record_reports_the_intervention(two_layer_model, images):
    model = two_layer_model
    iv = model.intervene(images, layer="layer2", remove=[0, 5], scale={3: 2.0, 7: 1.0}, top_k=3)
    names = model.class_names
    for n in range(4):
        record = intervention_record(iv, n, names)
        assert set(record) == {"layer", "edits", "edited_concepts", "target", "contrast", "before", "after", "change"}
        assert record["edited_concepts"] == 3
        assert record["layer"] == "layer2"
        contributions = iv.before.contributions["layer2"][n]
        assert [e["concept"] for e in record["edits"]] == sorted([0, 3, 5], key=lambda c: -abs(contributions[c]))
        for edit in record["edits"]:  # concept 7 has factor 1: no edit
            assert edit["factor"] == {0: 0.0, 3: 2.0, 5: 0.0}[edit["concept"]]
            assert edit["contribution"] == pytest.approx(float(contributions[edit["concept"]]), rel=1e-6)
        target = int(iv.before.target[n])
        assert record["target"] == {"index": target, "name": names[target]} and record["contrast"] is None
        prediction = int(iv.before.logits[n].argmax())
        assert record["before"]["prediction"]["index"] == prediction
        assert record["before"]["prediction"]["logit"] == pytest.approx(float(iv.before.logits[n, prediction]))
        assert record["before"]["explained"] == pytest.approx(float(iv.before.explained[n]))
        probability = float(torch.softmax(iv.before.logits[n], dim=0)[target])
        assert record["before"]["probability_of_target"] == pytest.approx(probability, rel=1e-6)
        after = explanation_record(iv.after, n, names)
        assert record["after"] == after | {
            "probability_of_target": pytest.approx(float(iv.after.probabilities[n, target]))
        }
        assert record["after"]["explained"] == pytest.approx(
            float(iv.after.logits[n, target] - model.logit_bias), abs=1e-6
        )
        change = record["change"]
        assert change["measured"] == pytest.approx(
            record["after"]["explained"] - record["before"]["explained"], abs=1e-6
        )
        predicted = -float(contributions[0] + contributions[5]) + float(contributions[3])
        assert change["predicted"] == pytest.approx(predicted, rel=1e-5, abs=1e-9)
        assert change["gap"] == pytest.approx(change["measured"] - change["predicted"], abs=1e-7)
    contrastive = model.intervene(images, remove_top=2, target=0, contrast="class_5")
    record = intervention_record(contrastive, 1, names, layers=["layer3"])
    assert record["contrast"] == {"index": 5, "name": "class_5"} and record["after"]["contrast"] == record["contrast"]
    assert len(record["edits"]) == 2 and all(e["factor"] == 0.0 for e in record["edits"])
    assert record["after"]["layer"] == "layer3"
    assert NUM_CLASSES == len(names)
    k = model.concept_layer("layer3").num_concepts
    everything = intervention_record(model.intervene(images, keep_top=1), 0, names)
    assert everything["edited_concepts"] == k - 1
    assert len(everything["edits"]) == min(k - 1, MAX_LISTED_EDITS)
    shown = [abs(e["contribution"]) for e in everything["edits"]]
    assert shown == sorted(shown, reverse=True)
