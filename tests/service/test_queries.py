"""The engine's region queries, ``where`` maps and interventions, in-process on the shipped default model.

Every number is checked against an independent computation on the model itself (a forward pass of a
copy whose decoder was edited by hand, per-position sums of the explanation's slots), and every refusal
by its status, reason and message.
"""

from __future__ import annotations

import base64
import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, render_sample
from service.engine import Engine
from service.queries import ConceptQuery, RegionQuery
from tests.service.test_engine import SIZE, refusal, settings

REL = 1e-4


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(resolve_artifact_path("default"), settings(), "fact-default", "test")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = render_sample(SyntheticConfig(), "test", 1)[0]
    return Image.fromarray(pixels)


def explain(engine: Engine, image: Image.Image, **kwargs) -> dict:
    heatmaps = kwargs.pop("heatmaps", "none")
    return engine.explain_many([image], [None], [None], 5, None, heatmaps, "bcos", **kwargs)[0]


def slot_sums(engine: Engine, image: Image.Image, layer: str, rows: slice, cols: slice) -> torch.Tensor:
    """``(K,)`` contributions of the positions in ``rows × cols`` of ``layer``'s grid, summed from the slots."""
    expl = engine.model.explain(engine.model.preprocess([image]), top_k=0)
    slots = expl.slots[layer]
    h, w = slots.spatial_shape
    values = slots.values[0].view(h, w, -1)[rows, cols].reshape(-1)
    ids = slots.concept_ids[0].view(h, w, -1)[rows, cols].reshape(-1)
    return torch.zeros(expl.contributions[layer].shape[1]).index_add_(0, ids, values)


def test_the_whole_image_as_a_region_is_the_explanation(engine, image):
    record = explain(engine, image, region=RegionQuery(None, (0, 0, SIZE, SIZE), None))
    region = record["region"]
    assert region["coverage"] == pytest.approx(1.0)
    assert region["total"] == pytest.approx(record["explained"], rel=REL)
    assert region["share"] == pytest.approx(1.0, rel=REL)
    assert region["outside"] == pytest.approx(0.0, abs=1e-4)
    assert [c["id"] for c in region["concepts"]] == [c["id"] for c in record["concepts"]]
    for inside in region["concepts"]:
        assert inside["contribution"] == pytest.approx(inside["in_image"], rel=REL)


def test_a_box_on_cell_edges_gives_those_positions_slot_sums(engine, image):
    layer = engine.layer_names[-1]
    h = engine.model.explain(engine.model.preprocess([image]), top_k=0).slots[layer].spatial_shape[0]
    cell = SIZE / h
    # rows 1..2, cols 0..1 of the grid, as a box in input pixels on the cell edges
    box = (0.0, 1 * cell, 2 * cell, 3 * cell)
    record = explain(engine, image, region=RegionQuery(None, box, None))
    expected = slot_sums(engine, image, layer, slice(1, 3), slice(0, 2))
    assert record["region"]["total"] == pytest.approx(float(expected.sum()), rel=REL, abs=1e-5)
    for concept in record["region"]["concepts"]:
        assert concept["contribution"] == pytest.approx(float(expected[concept["id"]]), rel=REL, abs=1e-5)
    ranked = expected.topk(len(record["region"]["concepts"])).indices.tolist()
    assert [c["id"] for c in record["region"]["concepts"]] == ranked


def test_complementary_regions_add_up_and_a_mask_equals_its_box(engine, image):
    left = explain(engine, image, region=RegionQuery(None, (0, 0, 20, SIZE), None))["region"]
    right = explain(engine, image, region=RegionQuery(None, (20, 0, SIZE, SIZE), None))["region"]
    whole = explain(engine, image)["explained"]
    assert left["total"] + right["total"] == pytest.approx(whole, rel=REL)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, :20] = 255
    as_mask = explain(engine, image, region=RegionQuery(None, None, Image.fromarray(mask)))["region"]
    assert as_mask["mask"] is True and as_mask["box"] is None
    assert as_mask["total"] == pytest.approx(left["total"], rel=1e-3, abs=1e-4)


def test_a_mask_of_another_size_is_preprocessed_like_the_image(engine, image):
    """A 96-px mask of the left half lines up with the 48-px model input's left half."""
    mask = np.zeros((2 * SIZE, 2 * SIZE), np.uint8)
    mask[:, :SIZE] = 255
    big = explain(engine, image.resize((2 * SIZE, 2 * SIZE)), region=RegionQuery(None, None, Image.fromarray(mask)))
    box = explain(engine, image.resize((2 * SIZE, 2 * SIZE)), region=RegionQuery(None, (0, 0, SIZE // 2, SIZE), None))
    assert big["region"]["coverage"] == pytest.approx(0.5, abs=0.02)
    assert big["region"]["total"] == pytest.approx(box["region"]["total"], rel=0.05, abs=0.02)


def test_where_maps_any_concept_and_sums_to_its_contribution(engine, image):
    record = explain(engine, image)
    top = record["concepts"][0]
    layer = record["layer"]
    where = explain(engine, image, where=ConceptQuery(None, top["id"]), heatmaps="array")["where"]
    assert where["layer"] == layer and where["id"] == top["id"]
    assert where["contribution"] == pytest.approx(top["contribution"], rel=REL)
    assert np.asarray(where["heatmap"]["data"]).sum() == pytest.approx(top["contribution"], rel=REL)
    assert where["in_region"] is None
    inactive = next(k for k in range(engine.model.concept_layer(layer).num_concepts) if k not in _active(engine, image))
    quiet = explain(engine, image, where=ConceptQuery(layer, inactive), heatmaps="array")["where"]
    assert quiet["contribution"] == 0.0 and np.abs(np.asarray(quiet["heatmap"]["data"])).sum() == 0.0
    png = explain(engine, image, where=ConceptQuery(None, top["id"]), heatmaps="png")["where"]["heatmap"]
    decoded = Image.open(io.BytesIO(base64.b64decode(png["png_base64"])))
    assert decoded.size == (SIZE, SIZE) and png["kind"] == "signed"


def test_where_inside_a_region_is_the_regions_own_figure(engine, image):
    record = explain(engine, image)
    top, layer = record["concepts"][0]["id"], record["layer"]
    h = engine.model.explain(engine.model.preprocess([image]), top_k=0).slots[layer].spatial_shape[0]
    cell = SIZE / h
    box = (cell, cell, 3 * cell, 4 * cell)  # grid rows 1..3, columns 1..2
    both = explain(engine, image, region=RegionQuery(None, box, None), where=ConceptQuery(None, top))
    expected = slot_sums(engine, image, layer, slice(1, 4), slice(1, 3))[top]
    assert both["where"]["in_region"] == pytest.approx(float(expected), rel=1e-3, abs=1e-5)
    listed = {c["id"]: c["contribution"] for c in both["region"]["concepts"]}
    if top in listed:  # the region lists its own top concepts only
        assert listed[top] == pytest.approx(both["where"]["in_region"], rel=1e-3, abs=1e-5)


def _active(engine: Engine, image: Image.Image) -> set[int]:
    expl = engine.model.explain(engine.model.preprocess([image]), top_k=0)
    layer = engine.layer_names[-1]
    return set((expl.activations[layer][0] > 0).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("query", "reason", "message"),
    [
        (RegionQuery(None, (10, 10, 5, 20), None), "bad_region", "region: "),
        (RegionQuery(None, (60, 60, 90, 90), None), "bad_region", "region: "),
        (RegionQuery(None, None, Image.new("L", (SIZE, SIZE), 0)), "bad_region", "region: "),
        (RegionQuery("layer9", (0, 0, 5, 5), None), "unknown_layer", "region: unknown concept layer 'layer9'"),
    ],
)
def test_bad_regions_are_refused(engine, image, query, reason, message):
    err = refusal(explain, engine, image, region=query)
    assert (err.status, err.reason) == (400, reason)
    assert err.message.startswith(message)


def test_where_of_an_unknown_concept_is_refused(engine, image):
    k = engine.model.concept_layer(engine.layer_names[-1]).num_concepts
    err = refusal(explain, engine, image, where=ConceptQuery(None, k))
    assert (err.status, err.reason) == (400, "unknown_concept")
    assert f"out of range [0, {k - 1}]" in err.message


# ----------------------------------------------------------------------------- interventions
def hand_edited_logits(engine: Engine, image: Image.Image, layer: str, factors: dict[int, float]) -> torch.Tensor:
    """Logits of a copy of the model whose decoder rows were multiplied by ``factors`` (an edit by hand)."""
    model = copy.deepcopy(engine.model)
    with torch.no_grad():
        for concept, factor in factors.items():
            model.concept_layer(layer).decoder[concept] *= factor
        return model(model.preprocess([image]))[0]


def test_removing_concepts_equals_a_model_edited_by_hand(engine, image):
    before = explain(engine, image)
    removed = [c["id"] for c in before["concepts"][:3]]
    result = engine.intervene(image, remove=removed)
    layer = engine.layer_names[-1]
    expected = hand_edited_logits(engine, image, layer, dict.fromkeys(removed, 0.0))
    after = result["after"]
    assert after["prediction"]["logit"] == pytest.approx(float(expected.max()), rel=REL, abs=1e-5)
    target = result["target"]["index"]
    assert result["change"]["measured"] == pytest.approx(
        float(expected[target]) - engine.model.logit_bias - before["explained"], rel=1e-3, abs=1e-4
    )
    predicted = -sum(c["contribution"] for c in before["concepts"][:3])
    assert result["change"]["predicted"] == pytest.approx(predicted, rel=REL)
    assert result["change"]["gap"] == pytest.approx(result["change"]["measured"] - predicted, rel=1e-3, abs=1e-5)
    assert {e["concept"] for e in result["edits"]} == set(removed)
    assert all(e["factor"] == 0.0 for e in result["edits"])
    assert removed[0] not in [c["id"] for c in after["concepts"] if c["contribution"] != 0.0]
    assert after["completeness"]["relative_residual"] < REL


def test_scaling_and_remove_top_and_keep_top(engine, image):
    before = explain(engine, image)
    layer = engine.layer_names[-1]
    top = before["concepts"][0]["id"]
    scaled = engine.intervene(image, scale={top: 2.0})
    expected = hand_edited_logits(engine, image, layer, {top: 2.0})
    assert scaled["after"]["explained"] == pytest.approx(
        float(expected[scaled["target"]["index"]]) - engine.model.logit_bias, rel=1e-3
    )
    assert scaled["change"]["predicted"] == pytest.approx(before["concepts"][0]["contribution"], rel=REL)
    by_top = engine.intervene(image, remove_top=2)
    assert sorted(e["concept"] for e in by_top["edits"]) == sorted(c["id"] for c in before["concepts"][:2])
    kept = engine.intervene(image, keep_top=1)
    assert [c["id"] for c in kept["after"]["concepts"] if c["contribution"] != 0.0] == [top]


def test_an_intervention_that_removes_nothing_active_changes_nothing(engine, image):
    layer = engine.layer_names[-1]
    inactive = next(k for k in range(engine.model.concept_layer(layer).num_concepts) if k not in _active(engine, image))
    result = engine.intervene(image, remove=[inactive])
    assert result["change"]["measured"] == 0.0 and result["change"]["predicted"] == 0.0
    assert result["after"]["prediction"] == result["before"]["prediction"]


@pytest.mark.parametrize(
    ("kwargs", "reason", "fragment"),
    [
        ({"remove": [10**6]}, "bad_intervention", "10000"),
        ({"remove_top": 2, "keep_top": 2}, "bad_intervention", "keep_top"),
        ({"remove": [1], "scale": {1: 0.5}}, "bad_intervention", "1"),
        ({"layer": "layer9", "remove": [1]}, "unknown_layer", "layer: unknown concept layer 'layer9'"),
        ({"target": "no such class", "remove": [1]}, "unknown_class", "unknown target class"),
        ({"top_k": 0}, "bad_top_k", "top_k must be"),
    ],
)
def test_bad_interventions_are_refused(engine, image, kwargs, reason, fragment):
    err = refusal(engine.intervene, image, **kwargs)
    assert (err.status, err.reason) == (400, reason)
    assert fragment in err.message
