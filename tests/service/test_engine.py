"""``service.engine.Engine`` driven in-process (no server) on the shipped default model and on a tiny softmax model.

Numbers in the responses are checked against the model's own computations (``model(...)``,
``model.explain(...)``), not against the engine's code path; refusals against their exact status, reason
and message.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.scale_artifact import build_scale_artifact
from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, render_sample
from service.engine import HEATMAP_FORMATS, HEATMAP_KINDS, MIN_HEATMAP_SIZE, Engine
from service.errors import RequestError
from service.images import default_max_pixels
from service.settings import Settings

REL, ABS = 1e-4, 1e-5  # float32 sums over a few hundred concepts / a few thousand pixels
CLASSES = 10  # of the default model
SIZE = 48  # its input size


def settings(**overrides: object) -> Settings:
    """The environment's settings with the fields the engine reads pinned (CPU, PyTorch, default limits)."""
    fixed = {"device": "cpu", "runtime": "pytorch", "max_pixels": None, "max_top_k": 20, "torch_threads": None}
    return dataclasses.replace(Settings.from_env(), **{**fixed, **overrides})


def refusal(call, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(resolve_artifact_path("default"), settings(), "fact-default", "test")


@pytest.fixture(scope="module")
def samples() -> list[tuple[Image.Image, int]]:
    """Three test images of the synthetic dataset the default model was trained on, with their labels."""
    config = SyntheticConfig()
    out = []
    for i in range(3):
        pixels, _, label = render_sample(config, "test", i)[:3]
        out.append((Image.fromarray(pixels), int(label)))
    return out


@pytest.fixture(scope="module")
def softmax_engine(tmp_path_factory) -> Engine:
    """A random-weight softmax model with 5 classes (all of them in ``top_classes``) and no concept statistics."""
    path = build_scale_artifact(
        tmp_path_factory.mktemp("softmax") / "tiny",
        backbone="bcos_resnet8",
        layers=[("layer2", 16, 4), ("layer3", 24, 4)],
        input_size=32,
        num_classes=5,
        output_activation="softmax",
        backbone_kwargs={"width": 8},
    )
    return Engine(path, settings(), "tiny", "v0")


def model_view(engine: Engine, image: Image.Image, **explain_args):
    """The model's own logits and explanation of ``image`` (what the engine's answer must agree with)."""
    batch = engine.model.preprocess([image])
    with torch.no_grad():
        logits = engine.model(batch)[0]
    return logits, engine.model.explain(batch, **explain_args)


# ----------------------------------------------------------------------------- construction
def test_engine_reports_the_default_model(engine):
    assert engine.layer_names == ("layer2", "layer3")
    assert engine.input_size == SIZE and engine.device == "cpu"
    assert engine.model_identity["name"] == "fact-default" and engine.model_identity["version"] == "test"
    assert re.fullmatch(r"[0-9a-f]{64}", engine.model_identity["weights_sha256"])
    assert engine.stats is not None and engine.stats_error is None
    assert engine.stats_problems == {"layer2": None, "layer3": None}
    assert engine.max_pixels == default_max_pixels(SIZE) == 2048**2


def test_the_pixel_limit_setting_overrides_the_default_and_is_applied_by_decode(engine):
    small = Engine(engine.artifact_dir, settings(max_pixels=100), "fact-default", "test")
    assert small.max_pixels == 100
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buffer, format="PNG")
    err = refusal(small.decode, buffer.getvalue())
    assert (err.status, err.reason, err.message) == (
        400,
        "too_many_pixels",
        "the image is 20×10 = 200 pixels; the limit is 100",
    )
    assert engine.decode(buffer.getvalue()).size == (20, 10)


# ----------------------------------------------------------------------------- resolve_class
@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (0, 0), (9, 9), ("0", 0), ("9", 9), (" 4 ", 4), ("007", 7), ("green triangle + yellow ring", 2)],
)
def test_resolve_class_accepts_indices_digit_strings_and_names(engine, value, expected):
    assert engine.resolve_class(value, "target") == expected


def test_every_class_name_resolves_to_its_index(engine):
    assert [engine.resolve_class(name, "target") for name in engine.model.class_names] == list(range(CLASSES))


@pytest.mark.parametrize("value", [10, -1, 10**9, "10", "-1", "999999999"])
def test_resolve_class_out_of_range(engine, value):
    err = refusal(engine.resolve_class, value, "contrast")
    assert (err.status, err.reason) == (400, "unknown_class")
    assert err.message == f"contrast class index {int(value)} is out of range [0, 9]"


@pytest.mark.parametrize("value", [True, False, 1.0, [1], {"index": 1}])
def test_resolve_class_refuses_bools_and_other_types(engine, value):
    err = refusal(engine.resolve_class, value, "target")
    assert (err.status, err.reason, err.message) == (
        400,
        "unknown_class",
        f"target must be a class index or name, got {value!r}",
    )


# non-ASCII digits (Arabic-Indic three, superscript two, fullwidth one) are names, not numbers;
# ten digits are a name too (no index is that long), and names are case-sensitive
@pytest.mark.parametrize("value", ["٣", "²", "１", "1234567890", "Red disc + blue square", "zebra", "", "1.0", "0x1"])
def test_resolve_class_treats_anything_else_as_a_name_and_refuses_unknown_names(engine, value):
    err = refusal(engine.resolve_class, value, "target")
    assert (err.status, err.reason) == (400, "unknown_class")
    assert err.message == (
        f"unknown target class {value!r}: use a class index in [0, 9] or a class name "
        "(GET /model lists the class names)"
    )


def test_resolve_class_shows_at_most_100_characters_of_a_long_name(engine):
    value = "x" * 100 + "TAIL" * 1000
    err = refusal(engine.resolve_class, value, "target")
    assert err.reason == "unknown_class" and repr("x" * 100) in err.message and "TAIL" not in err.message
    assert len(err.message) < 250


# ----------------------------------------------------------------------------- check_layers / heatmaps / top_k
@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (None, ("layer2", "layer3")),
        ([], ("layer2", "layer3")),
        (["layer3"], ("layer3",)),
        (["layer2"], ("layer2",)),
        (["layer3", "layer2"], ("layer2", "layer3")),  # forward order, whatever the request's
        (("layer2", "layer3"), ("layer2", "layer3")),
    ],
)
def test_check_layers_returns_the_selection_in_forward_order(engine, layers, expected):
    assert engine.check_layers(layers) == expected


def test_check_layers_names_unknown_layers_and_the_valid_ones(engine):
    err = refusal(engine.check_layers, ["layer3", "layer9", "fc", "layer9"])
    assert (err.status, err.reason, err.message) == (
        400,
        "unknown_layer",
        "unknown concept layer(s) 'fc', 'layer9'; this model's concept layers: ['layer2', 'layer3']",
    )


def test_check_layers_shows_at_most_5_unknown_names_of_at_most_64_characters(engine):
    err = refusal(engine.check_layers, [f"bad{i}" for i in range(7)] + ["L" * 100])
    assert err.reason == "unknown_layer"
    assert err.message == (
        f"unknown concept layer(s) {'L' * 64!r}, 'bad0', 'bad1', 'bad2', 'bad3' …; "
        "this model's concept layers: ['layer2', 'layer3']"
    )


def test_check_layers_refuses_a_layer_listed_twice(engine):
    err = refusal(engine.check_layers, ["layer3", "layer2", "layer3"])
    assert (err.status, err.reason, err.message) == (400, "unknown_layer", "layers lists ['layer3'] more than once")


@pytest.mark.parametrize("heatmaps", HEATMAP_FORMATS)
@pytest.mark.parametrize("kind", HEATMAP_KINDS)
def test_check_heatmaps_accepts_every_format_and_kind(engine, heatmaps, kind):
    assert engine.check_heatmaps(heatmaps, kind, None) == SIZE
    assert engine.check_heatmaps(heatmaps, kind, MIN_HEATMAP_SIZE) == MIN_HEATMAP_SIZE
    assert engine.check_heatmaps(heatmaps, kind, SIZE) == SIZE


@pytest.mark.parametrize("heatmaps", ["PNG", "jpeg", "", "svg"])
def test_check_heatmaps_refuses_an_unknown_format_listing_the_formats(engine, heatmaps):
    err = refusal(engine.check_heatmaps, heatmaps, "bcos", None)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_heatmaps",
        f"heatmaps must be one of ['none', 'png', 'png8', 'webp', 'array', 'float32'], got {heatmaps!r}",
    )


def test_check_heatmaps_refuses_an_unknown_kind_listing_the_kinds(engine):
    err = refusal(engine.check_heatmaps, "png", "gradcam", None)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_heatmap_kind",
        "heatmap_kind must be one of ['bcos', 'signed', 'spatial'], got 'gradcam'",
    )


@pytest.mark.parametrize(
    ("size", "shown"),
    [(7, "7"), (0, "0"), (-8, "-8"), (49, "49"), (True, "True"), (16.0, "16.0"), ("16", "'16'"), (10**60, None)],
)
def test_check_heatmaps_refuses_a_size_outside_8_to_the_input_size(engine, size, shown):
    err = refusal(engine.check_heatmaps, "png", "bcos", size)
    assert (err.status, err.reason) == (400, "invalid_request")
    shown = shown or repr(size)[:40] + "…"  # long values are cut to 40 characters
    assert err.message == (
        "field 'heatmap_size' must be an integer in [8, 48] (pixels per side; 48 is this model's input size, "
        f"the default), got {shown}"
    )


@pytest.mark.parametrize("top_k", [1, 7, 20])
def test_check_top_k_accepts_1_to_the_limit(engine, top_k):
    assert engine.check_top_k(top_k) == top_k


@pytest.mark.parametrize("top_k", [0, -1, 21, True, 2.0, "3", None])
def test_check_top_k_refuses_others(engine, top_k):
    err = refusal(engine.check_top_k, top_k)
    assert (err.status, err.reason, err.message) == (
        400,
        "bad_top_k",
        f"top_k must be an integer in [1, 20], got {top_k!r}",
    )


def test_the_top_k_limit_comes_from_the_settings(engine):
    tight = Engine(engine.artifact_dir, settings(max_top_k=3), "fact-default", "test")
    assert tight.check_top_k(3) == 3
    assert refusal(tight.check_top_k, 4).message == "top_k must be an integer in [1, 3], got 4"


# ----------------------------------------------------------------------------- predict
def test_predict_of_nothing_is_nothing(engine):
    assert engine.predict([]) == []


def test_predict_agrees_with_the_model_and_its_explanation(engine, samples):
    images = [image for image, _ in samples]
    results = engine.predict(images, top_k=4)
    assert len(results) == len(images)
    for (image, label), result in zip(samples, results, strict=True):
        logits, expl = model_view(engine, image, top_k=0)
        probabilities = torch.sigmoid(logits)  # the default model's output activation
        assert result["prediction"] == result["top_classes"][0]
        assert result["prediction"]["index"] == label == int(logits.argmax())  # it was trained on these images
        assert [c["index"] for c in result["top_classes"]] == logits.argsort(descending=True)[:5].tolist()
        for entry in result["top_classes"]:
            assert entry["name"] == engine.model.class_names[entry["index"]]
            assert entry["logit"] == pytest.approx(float(logits[entry["index"]]), rel=REL, abs=ABS)
            assert entry["probability"] == pytest.approx(float(probabilities[entry["index"]]), rel=REL, abs=ABS)
        # the closed-form contributions of the last layer equal the full explanation's, to the predicted class
        contributions = expl.contributions["layer3"][0]
        top = contributions.topk(4)
        assert [c["layer"] for c in result["concepts"]] == ["layer3"] * 4
        assert [c["id"] for c in result["concepts"]] == top.indices.tolist()
        np.testing.assert_allclose([c["contribution"] for c in result["concepts"]], top.values, rtol=REL, atol=ABS)
        assert result["logit_bias"] == pytest.approx(engine.model.logit_bias)
        assert result["model"] == engine.model_identity


def test_predict_in_a_batch_equals_one_by_one(engine, samples):
    images = [image for image, _ in samples]
    batched = engine.predict(images, top_k=3)
    for image, result in zip(images, batched, strict=True):
        (alone,) = engine.predict([image], top_k=3)
        assert [c["id"] for c in alone["concepts"]] == [c["id"] for c in result["concepts"]]
        assert alone["prediction"]["index"] == result["prediction"]["index"]
        assert alone["prediction"]["logit"] == pytest.approx(result["prediction"]["logit"], rel=REL, abs=ABS)


def test_softmax_probabilities_sum_to_1_over_the_classes(softmax_engine, samples):
    image = samples[0][0]
    (result,) = softmax_engine.predict([image], top_k=30)  # more than the layer's 24 concepts: all of them
    logits, expl = model_view(softmax_engine, image, top_k=0)
    assert len(result["top_classes"]) == 5  # every class
    assert sum(c["probability"] for c in result["top_classes"]) == pytest.approx(1.0, abs=1e-5)
    expected = torch.softmax(logits, dim=0)
    for entry in result["top_classes"]:
        assert entry["probability"] == pytest.approx(float(expected[entry["index"]]), rel=REL, abs=ABS)
    assert result["prediction"] == result["top_classes"][0]
    contributions = expl.contributions["layer3"][0]
    assert len(result["concepts"]) == contributions.numel() == 24
    got = {c["id"]: c["contribution"] for c in result["concepts"]}
    np.testing.assert_allclose([got[k] for k in range(24)], contributions, rtol=REL, atol=ABS)
    assert sum(got.values()) == pytest.approx(float(expl.explained[0]), rel=REL, abs=ABS)


# ----------------------------------------------------------------------------- explain
def test_explain_is_complete_and_agrees_with_the_model(engine, samples):
    image, label = samples[1]
    result = engine.explain(image, None, None, 5, None, "none", "bcos")
    logits, expl = model_view(engine, image, top_k=5)
    contributions, activations = expl.contributions["layer3"][0], expl.activations["layer3"][0]
    bias = engine.model.logit_bias
    assert result["target"] == {"index": label, "name": engine.model.class_names[label]}
    assert result["contrast"] is None and result["layer"] == "layer3"
    # the explained quantity is the target's logit without the bias, from a plain forward pass
    assert result["explained"] == pytest.approx(float(logits[label]) - bias, rel=REL, abs=ABS)
    # completeness: all concepts' contributions sum to it, in the model's explanation and in the answer
    assert float(contributions.sum()) == pytest.approx(result["explained"], rel=REL, abs=ABS)
    assert result["completeness"]["sum_of_contributions"] == pytest.approx(result["explained"], rel=REL, abs=ABS)
    assert abs(result["completeness"]["residual"]) <= ABS * max(1.0, abs(result["explained"]))
    shown = sum(c["contribution"] for c in result["concepts"])
    assert shown + result["other"]["contribution"] == pytest.approx(result["explained"], rel=REL, abs=ABS)
    # the top concepts, their shares and activations
    top = contributions.topk(5)
    assert [c["id"] for c in result["concepts"]] == top.indices.tolist()
    positive = float(contributions.clamp(min=0).sum())
    for concept, value, index in zip(result["concepts"], top.values.tolist(), top.indices.tolist(), strict=True):
        assert concept["layer"] == "layer3" and concept["heatmap"] is None
        assert concept["contribution"] == pytest.approx(value, rel=REL, abs=ABS)
        assert concept["share"] == pytest.approx(value / positive, rel=REL, abs=ABS)
        assert concept["activation"] == pytest.approx(float(activations[index]), rel=REL, abs=ABS)
        assert len(concept["children"]) == 3 and {c["layer"] for c in concept["children"]} == {"layer2"}
    assert result["active_concepts"] == {
        name: int((expl.activations[name][0] > 0).sum()) for name in ("layer2", "layer3")
    }
    assert result["faithfulness"] == {"method": "fact", "exact": True}
    assert set(result["timings_ms"]) == {"preprocess", "forward", "backward", "render"}


def test_explain_children_are_the_top_lower_concepts_of_the_trace(engine, samples):
    image = samples[0][0]
    result = engine.explain(image, None, None, 3, None, "none", "bcos")
    _, expl = model_view(engine, image, top_k=3)
    (trace,) = expl.traces
    assert (trace.upper, trace.lower) == ("layer3", "layer2")
    for rank, concept in enumerate(result["concepts"]):
        built = trace.contributions[0, rank]  # (K_lower,) sums to the upper concept's activation
        assert float(built.sum()) == pytest.approx(concept["activation"], rel=REL, abs=ABS)
        top = built.topk(3)
        assert [c["id"] for c in concept["children"]] == top.indices.tolist()
        np.testing.assert_allclose(
            [c["contribution_to_parent"] for c in concept["children"]], top.values, rtol=REL, atol=ABS
        )


def test_explain_a_given_target_and_contrast(engine, samples):
    image, label = samples[0]
    target, contrast = (label + 3) % CLASSES, (label + 5) % CLASSES
    result = engine.explain(image, str(target), engine.model.class_names[contrast], 4, None, "none", "bcos")
    logits, expl = model_view(engine, image, top_k=4, target=target, contrast=contrast)
    assert result["target"]["index"] == target and result["contrast"]["index"] == contrast
    assert result["prediction"]["index"] == label  # the prediction does not follow the target
    assert result["explained"] == pytest.approx(float(logits[target] - logits[contrast]), rel=REL, abs=ABS)
    assert float(expl.contributions["layer3"][0].sum()) == pytest.approx(result["explained"], rel=REL, abs=ABS)
    assert [c["id"] for c in result["concepts"]] == expl.top_ids["layer3"][0].tolist()


def test_explain_a_lower_layer_alone_is_complete_too(engine, samples):
    image, label = samples[2]
    result = engine.explain(image, None, None, 3, ["layer2"], "none", "bcos")
    logits, expl = model_view(engine, image, top_k=3)
    assert result["layer"] == "layer2" and set(result["active_concepts"]) == {"layer2"}
    assert all(c["layer"] == "layer2" and c["children"] == [] for c in result["concepts"])
    assert float(expl.contributions["layer2"][0].sum()) == pytest.approx(result["explained"], rel=REL, abs=ABS)
    assert result["explained"] == pytest.approx(float(logits[label]) - engine.model.logit_bias, rel=REL, abs=ABS)
    assert [c["id"] for c in result["concepts"]] == expl.top_ids["layer2"][0].tolist()


def test_explain_refuses_a_contrast_equal_to_the_target(engine, samples):
    image, label = samples[0]
    err = refusal(engine.explain, image, label, label, 3, None, "none", "bcos")
    assert (err.status, err.reason) == (400, "contrast_equals_target")
    name = engine.model.class_names[label]
    assert err.message == (
        f"contrast class {name!r} ({label}) equals the target class for image 0: "
        "a contrast must be another class (why the target rather than it)"
    )
    err = refusal(engine.explain, image, None, label, 3, None, "none", "bcos")  # the default target is `label`
    assert err.reason == "contrast_equals_target" and f"({label})" in err.message


def test_explain_validates_every_option_before_any_model_work(engine, samples, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the model ran before the options were checked")

    monkeypatch.setattr(engine.model, "preprocess", no_model_work)
    image = samples[0][0]
    cases = [
        ((image, None, None, 0, None, "none", "bcos"), "bad_top_k"),
        ((image, None, None, 3, ["layer4"], "none", "bcos"), "unknown_layer"),
        ((image, None, None, 3, None, "gif", "bcos"), "bad_heatmaps"),
        ((image, None, None, 3, None, "png", "cam"), "bad_heatmap_kind"),
        ((image, "zebra", None, 3, None, "none", "bcos"), "unknown_class"),
        ((image, None, 11, 3, None, "none", "bcos"), "unknown_class"),
    ]
    for args, reason in cases:
        err = refusal(engine.explain, *args)
        assert (err.status, err.reason) == (400, reason), args
    err = refusal(engine.explain, image, None, None, 3, None, "png", "bcos", heatmap_size=4)
    assert (err.status, err.reason) == (400, "invalid_request")


def test_explain_many_with_mixed_targets_and_contrasts_equals_one_by_one(engine, samples):
    images = [image for image, _ in samples]
    targets = [None, 4, None]
    contrasts = [None, None, (samples[2][1] + 1) % CLASSES]  # another class than image 2's prediction
    many = engine.explain_many(images, targets, contrasts, 3, None, "none", "bcos")
    assert len(many) == 3
    for image, target, contrast, result in zip(images, targets, contrasts, many, strict=True):
        alone = engine.explain(image, target, contrast, 3, None, "none", "bcos")
        assert result["target"] == alone["target"] and result["contrast"] == alone["contrast"]
        assert [c["id"] for c in result["concepts"]] == [c["id"] for c in alone["concepts"]]
        assert result["explained"] == pytest.approx(alone["explained"], rel=REL, abs=ABS)
    assert many[0]["target"]["index"] == samples[0][1] and many[1]["target"]["index"] == 4
    assert many[2]["contrast"]["index"] == contrasts[2]


def test_explain_many_names_the_request_item_whose_contrast_equals_its_target(engine, samples):
    (a, _), (b, label) = samples[0], samples[1]
    err = refusal(engine.explain_many, [a, b], [None, label], [None, label], 3, None, "none", "bcos")
    assert err.reason == "contrast_equals_target" and "for image 1" in err.message


# ----------------------------------------------------------------------------- heatmaps
@pytest.mark.parametrize(
    ("heatmaps", "kind", "size", "pillow_format", "mode"),
    [
        ("png", "bcos", None, "PNG", "RGBA"),
        ("png8", "signed", 24, "PNG", "P"),
        ("webp", "spatial", 16, "WEBP", "RGBA"),
    ],
)
def test_image_heatmaps_are_one_picture_per_concept_with_their_format_fields(
    engine, samples, heatmaps, kind, size, pillow_format, mode
):
    result = engine.explain(samples[0][0], None, None, 2, None, heatmaps, kind, heatmap_size=size)
    side = size or SIZE
    key = "webp_base64" if heatmaps == "webp" else "png_base64"
    assert len(result["concepts"]) == 2
    for concept in result["concepts"]:
        heatmap = concept["heatmap"]
        media_type = "image/webp" if heatmaps == "webp" else "image/png"
        assert {k: v for k, v in heatmap.items() if k != key} == {
            "format": heatmaps,
            "kind": kind,
            "size": [side, side],
            "media_type": media_type,
        }
        with Image.open(io.BytesIO(base64.b64decode(heatmap[key], validate=True))) as picture:
            assert picture.format == pillow_format and picture.size == (side, side)
            assert picture.mode == mode or (heatmaps == "webp" and picture.mode == "RGB")


def test_array_heatmaps_are_pixel_contributions_summing_to_each_concepts_activation(engine, samples):
    image = samples[1][0]
    full = engine.explain(image, None, None, 3, None, "array", "bcos")
    small = engine.explain(image, None, None, 3, None, "array", "signed", heatmap_size=16)
    batch = engine.model.preprocess([image])
    expl = engine.model.explain(batch, top_k=3, maps=True, map_kinds=("concepts",), map_layers=("layer3",))
    pixels = expl.maps.pixel_contributions(expl.maps.concepts["layer3"])[0]  # (R, 48, 48)
    for rank, (a, b) in enumerate(zip(full["concepts"], small["concepts"], strict=True)):
        assert a["heatmap"]["format"] == "array" and a["heatmap"]["kind"] == "contribution"
        assert a["heatmap"]["shape"] == [SIZE, SIZE] and b["heatmap"]["shape"] == [16, 16]
        data = np.asarray(a["heatmap"]["data"])
        np.testing.assert_allclose(data, pixels[rank], rtol=REL, atol=1e-6)
        assert data.sum() == pytest.approx(a["activation"], rel=REL, abs=ABS)
        blocks = data.reshape(16, 3, 16, 3).sum(axis=(1, 3))  # 3×3 block sums
        np.testing.assert_allclose(b["heatmap"]["data"], blocks, rtol=REL, atol=1e-5)


def test_float32_heatmaps_are_the_array_maps_as_little_endian_floats(engine, samples):
    image = samples[2][0]
    arrays = engine.explain(image, None, None, 2, None, "array", "spatial")
    floats = engine.explain(image, None, None, 2, None, "float32", "spatial")
    for a, f in zip(arrays["concepts"], floats["concepts"], strict=True):
        heatmap = f["heatmap"]
        assert {k: v for k, v in heatmap.items() if k != "data_base64"} == {
            "format": "float32",
            "kind": "spatial",
            "shape": a["heatmap"]["shape"],
            "dtype": "<f4",
        }
        values = np.frombuffer(base64.b64decode(heatmap["data_base64"]), dtype="<f4").reshape(heatmap["shape"])
        np.testing.assert_allclose(values, np.asarray(a["heatmap"]["data"], dtype=np.float32), rtol=1e-6, atol=1e-7)
        # spatial maps: each position's contribution to the explained logit, at the layer's resolution
        assert values.sum() == pytest.approx(f["contribution"], rel=REL, abs=ABS)
    _, expl = model_view(engine, image, top_k=2)
    assert arrays["concepts"][0]["heatmap"]["shape"] == list(expl.spatial["layer3"].shape[-2:])


# ----------------------------------------------------------------------------- model summary and concept cards
def test_model_summary_describes_the_model(engine):
    summary = engine.model_summary()
    assert summary["classes"] == list(engine.model.class_names) and len(summary["classes"]) == CLASSES
    assert [layer["name"] for layer in summary["concept_layers"]] == ["layer2", "layer3"]
    assert [layer["num_concepts"] for layer in summary["concept_layers"]] == [128, 256]
    assert summary["input_resolution"] == {"height": SIZE, "width": SIZE, "channels": 3}
    assert summary["heatmaps"] == {
        "formats": list(HEATMAP_FORMATS),
        "kinds": list(HEATMAP_KINDS),
        "size": {"min": MIN_HEATMAP_SIZE, "max": SIZE, "default": SIZE},
    }
    assert summary["size"]["parameters"] == sum(p.numel() for p in engine.model.parameters())
    assert summary["concept_statistics"] is True and summary["concept_cards"] == {"layer2": True, "layer3": True}
    assert summary["runtime"] == {"predict": "pytorch", "explain": "pytorch"}


def test_concept_list_reads_the_statistics(engine):
    listing = engine.concept_list("layer2")
    frequency = engine.stats["layer2/frequency"]
    means = engine.stats["layer2/class_mean_contributions"]  # (classes, K)
    assert listing["layer"] == "layer2" and [c["id"] for c in listing["concepts"]] == list(range(128))
    for concept in listing["concepts"][:16]:
        k = concept["id"]
        best = int(means[:, k].argmax())
        assert concept["frequency"] == pytest.approx(float(frequency[k]))
        assert concept["top_class"] == engine.model.class_names[best]
        assert concept["top_class_mean_contribution"] == pytest.approx(float(means[:, k].max()))


@pytest.mark.parametrize("call", ["concept_list", "concept_card"])
def test_an_unknown_layer_is_a_404_naming_the_layers(engine, call):
    args = ("layer4",) if call == "concept_list" else ("layer4", 0)
    err = refusal(getattr(engine, call), *args)
    assert (err.status, err.reason, err.message) == (
        404,
        "unknown_layer",
        "no concept layer 'layer4'; concept layers: ['layer2', 'layer3']",
    )


@pytest.mark.parametrize(("layer", "concept", "k"), [("layer3", 256, 256), ("layer3", -1, 256), ("layer2", 128, 128)])
def test_a_concept_out_of_range_is_a_404_with_the_range(engine, layer, concept, k):
    err = refusal(engine.concept_card, layer, concept)
    assert (err.status, err.reason, err.message) == (
        404,
        "unknown_concept",
        f"concept id {concept} is out of range [0, {k - 1}] for {layer!r}",
    )


@pytest.mark.parametrize("call", ["concept_list", "concept_card"])
def test_cards_of_a_model_without_statistics_are_a_404_saying_what_to_run(softmax_engine, call):
    args = ("layer3",) if call == "concept_list" else ("layer3", 0)
    err = refusal(getattr(softmax_engine, call), *args)
    assert (err.status, err.reason, err.message) == (
        404,
        "no_statistics",
        "this model has no concept statistics, so there are no concept cards or listings; compute them with "
        f"`fact stats --model {softmax_engine.artifact_dir}` (they are saved next to the model; GET /model "
        "reports concept_statistics)",
    )
    err = refusal(getattr(softmax_engine, call), "layer4", *args[1:])  # the layer is checked first
    assert (err.status, err.reason) == (404, "unknown_layer")
