"""The one serialiser (fact_model.serialize) against quantities recomputed from the Explanation's tensors."""

from __future__ import annotations

import json

import pytest
import torch

from fact_model.bcos.encoding import encode_rgb
from fact_model.explain import closed_form_contributions
from fact_model.serialize import CHILDREN, explanation_record, prediction_record
from tests.conftest import make_model


@pytest.fixture(scope="module")
def model():
    return make_model([("layer2", 16, 2), ("layer3", 24, 4)])


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def test_record_numbers_are_the_explanations(model, images):
    expl = model.explain(images, top_k=4, contrast=1, target=[0, 2, 3])
    for n in range(images.shape[0]):
        record = json.loads(json.dumps(explanation_record(expl, n, model.class_names)))  # JSON-ready as it is
        contributions = expl.contributions["layer3"][n].double()
        positive = contributions.clamp(min=0).sum().item()
        assert record["layer"] == "layer3"
        assert record["target"]["index"] == [0, 2, 3][n] and record["contrast"] == {"index": 1, "name": "class_1"}
        assert [c["id"] for c in record["concepts"]] == expl.top_ids["layer3"][n].tolist()
        for rank, concept in enumerate(record["concepts"]):
            k = concept["id"]
            assert concept["contribution"] == pytest.approx(contributions[k].item(), rel=1e-6)
            assert concept["share"] == pytest.approx(contributions[k].item() / positive, rel=1e-6)
            lower = expl.traces[0].contributions[n, rank].double()
            want_children = lower.topk(CHILDREN).indices.tolist()
            assert [child["id"] for child in concept["children"]] == want_children
            assert all(child["layer"] == "layer2" for child in concept["children"])
        # the TopConcept list of the Explanation carries the same shares as the record
        top = [c for c in expl.top_concepts[n] if c.layer == "layer3"]
        assert [c.share for c in top] == [c["share"] for c in record["concepts"]]
        listed = sum(c["contribution"] for c in record["concepts"])
        assert listed + record["other"]["contribution"] == pytest.approx(record["explained"], rel=1e-5, abs=1e-6)
        assert record["completeness"]["sum_of_contributions"] == pytest.approx(contributions.sum().item(), rel=1e-5)
        assert record["active_concepts"] == {
            name: int((expl.activations[name][n] > 0).sum()) for name in ("layer2", "layer3")
        }


def test_a_lower_layer_record_lists_that_layer_without_children(model, images):
    expl = model.explain(images[:1], top_k=2)
    record = explanation_record(expl, 0, model.class_names, layers=["layer2"])
    assert record["layer"] == "layer2" and list(record["active_concepts"]) == ["layer2"]
    assert [c["id"] for c in record["concepts"]] == expl.top_ids["layer2"][0].tolist()
    assert all(c["children"] == [] for c in record["concepts"])


def test_closed_form_prediction_equals_the_backward_pass(model, images):
    """The prediction path's closed form and explain()'s autograd-based contributions agree, concept by concept."""
    with torch.no_grad():
        record = model.forward_encoded(encode_rgb(images))
    predicted = record.scores.argmax(dim=1)
    closed = closed_form_contributions(model, record, predicted)
    expl = model.explain(images, top_k=0, target=predicted.tolist())
    torch.testing.assert_close(closed, expl.contributions["layer3"], rtol=1e-5, atol=1e-7)
    probabilities = model.probabilities(record.logits)
    top = closed.topk(3, dim=1)
    out = prediction_record(
        model.class_names, record.logits[0], probabilities[0], expl.ranking[0], "layer3", top.indices[0],
        top.values[0], model.logit_bias,
    )  # fmt: skip
    assert out["prediction"]["index"] == int(predicted[0]) == out["top_classes"][0]["index"]
    assert [c["id"] for c in out["concepts"]] == top.indices[0].tolist()
    assert out["prediction"]["probability"] == pytest.approx(float(probabilities[0, predicted[0]]))
    assert [c["contribution"] for c in out["concepts"]] == top.values[0].tolist()
