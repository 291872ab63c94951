"""Serving larger inputs: compact heatmap encodings, heatmap_size, exact float maps, concept cards, /model size.

Engine-level tests on tiny random-weight artifacts (``benchmarks.scale_artifact``), checked against
independent computations (numpy block means and sums, the model's own maps, the safetensors
file), plus one real ``bentoml serve`` for the HTTP contract (400/404 envelopes, never a 500).
Speed is not tested here: ``python -m benchmarks.service_latency --scale`` measures it (docs/LOAD.md).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import shutil
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from benchmarks.scale_artifact import add_statistics, build_scale_artifact
from service import engine as engine_module
from service.engine import Engine
from service.errors import RequestError
from service.schemas import HeatmapFormat, HeatmapKind
from service.settings import SETTINGS
from tests._support.server import http, post_json, post_multipart, running_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SIZE = 64  # input side of the small test model
CLASSES = 6
TINY = {"backbone": "bcos_resnet8", "backbone_kwargs": {"width": 8}, "num_classes": CLASSES}


def _settings():
    return dataclasses.replace(SETTINGS, device="cpu", artifact=None, runtime="pytorch")


def _photo(size: int) -> Image.Image:
    """A natural photograph (scikit-image's astronaut), centre-cropped and resized to ``size``."""
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.astronaut()).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_scale_artifact(
        tmp_path_factory.mktemp("scale") / "tiny",
        layers=[("layer2", 32, 4), ("layer3", 64, 4)],
        input_size=SIZE,
        **TINY,
    )


@pytest.fixture(scope="module")
def engine(artifact):
    return Engine(artifact, _settings(), "tiny", "test")


@pytest.fixture(scope="module")
def photo():
    return _photo(SIZE)


def _maps(engine: Engine, image: Image.Image, top_k: int = 5):
    """The model's own explanation of ``image`` (predicted class, last layer's top concepts), not the engine's."""
    batch = engine.model.preprocess([image])
    layer = engine.layer_names[-1]
    expl = engine.model.explain(batch, top_k=top_k, maps=True, map_kinds=("concepts",), map_layers=(layer,))
    return expl, layer


def _decode(heatmap: dict) -> np.ndarray:
    """A heatmap entry → float RGBA ``(h, w, 4)`` in [0, 1]."""
    key = "webp_base64" if heatmap["format"] == "webp" else "png_base64"
    with Image.open(io.BytesIO(base64.b64decode(heatmap[key]))) as picture:
        return np.asarray(picture.convert("RGBA"), dtype=np.float64) / 255


def _block_mean_premultiplied(rgba: np.ndarray, factor: int) -> np.ndarray:
    """Independent area downsampling by an integer factor: block means of (rgb·a, a), then un-premultiplied."""
    r, h, w, _ = rgba.shape
    premultiplied = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=-1)
    blocks = premultiplied.reshape(r, h // factor, factor, w // factor, factor, 4).mean(axis=(2, 4))
    alpha = blocks[..., 3:]
    colour = np.divide(blocks[..., :3], alpha, out=np.zeros_like(blocks[..., :3]), where=alpha > 0)
    return np.concatenate([colour, alpha], axis=-1)


def _composite(rgba: np.ndarray, background: float) -> np.ndarray:
    return rgba[..., :3] * rgba[..., 3:] + background * (1 - rgba[..., 3:])


def _reference_rgba(engine: Engine, photo: Image.Image, kind: str, heatmap_size: int) -> tuple[np.ndarray, list[int]]:
    """The float rendering the service quantises, computed here from the model's maps and numpy block means."""
    from fact_model import render

    expl, layer = _maps(engine, photo)
    weights, inputs = expl.maps.concepts[layer][0], expl.maps.inputs[0]
    if kind == "bcos":
        rgba = render.bcos_colour(weights, inputs[None].expand_as(weights))
    else:
        rgba = render.signed_heatmaps((inputs[None] * weights).sum(dim=1), inputs[:3])
    return _block_mean_premultiplied(rgba.double().numpy(), SIZE // heatmap_size), expl.top_ids[layer][0].tolist()


# --------------------------------------------------------------------------- encodings vs the float maps


@pytest.mark.parametrize("heatmap_size", [SIZE, SIZE // 2])
@pytest.mark.parametrize("kind", ["bcos", "signed"])
def test_png_heatmaps_equal_the_float_rendering_to_8_bit_rounding(engine, photo, kind, heatmap_size):
    result = engine.explain(photo, None, None, 5, None, "png", kind, heatmap_size=heatmap_size)
    reference, ids = _reference_rgba(engine, photo, kind, heatmap_size)
    assert [c["id"] for c in result["concepts"]] == ids
    decoded = np.stack([_decode(c["heatmap"]) for c in result["concepts"]])
    assert decoded.shape == (5, heatmap_size, heatmap_size, 4)
    assert all(c["heatmap"]["size"] == [heatmap_size, heatmap_size] for c in result["concepts"])
    step = 1 / 255
    # alpha and the visible colour (premultiplied) are the float values rounded to 8 bits
    np.testing.assert_allclose(decoded[..., 3], reference[..., 3], atol=0.5 * step + 1e-6)
    visible = reference[..., 3] > 0
    premultiplied = decoded[..., :3] * decoded[..., 3:]
    expected = reference[..., :3] * reference[..., 3:]
    assert np.abs(premultiplied - expected).max() <= step + 1e-6
    # the colour of invisible pixels is cleared (that is what makes the transparent area compress)
    assert (decoded[~visible][:, :3] == 0).all()


@pytest.mark.parametrize(
    ("encoding", "kind"), [("webp", "bcos"), ("webp", "signed"), ("png8", "bcos"), ("png8", "signed")]
)
def test_compact_heatmaps_match_the_float_rendering_within_their_quantisation_error(engine, photo, encoding, kind):
    heatmap_size = SIZE // 2
    result = engine.explain(photo, None, None, 5, None, encoding, kind, heatmap_size=heatmap_size)
    reference, _ = _reference_rgba(engine, photo, kind, heatmap_size)
    decoded = np.stack([_decode(c["heatmap"]) for c in result["concepts"]])
    assert decoded.shape == reference.shape
    heatmap = result["concepts"][0]["heatmap"]
    assert heatmap["format"] == encoding and heatmap["media_type"] == (
        "image/webp" if encoding == "webp" else "image/png"
    )
    # what a viewer sees: the map composited over black and over white. Palette PNG: ≤ 256 colours per map;
    # WebP: 4:2:0 chroma, so the 1-pixel detail of these random maps is blurred (measured mean 0.029, p99 0.19)
    error = np.stack([np.abs(_composite(decoded, b) - _composite(reference, b)) for b in (0.0, 1.0)])
    mean_bound, p99_bound = (0.02, 0.1) if encoding == "png8" else (0.05, 0.3)
    assert error.mean() <= mean_bound, error.mean()
    assert np.percentile(error, 99) <= p99_bound, np.percentile(error, 99)
    if encoding == "webp":  # lossy colour, but the alpha plane is lossless
        np.testing.assert_allclose(decoded[..., 3], reference[..., 3], atol=0.5 / 255 + 1e-6)


def test_float_maps_are_exact_at_the_input_size_and_block_sums_below_it(engine, photo):
    expl, layer = _maps(engine, photo)
    per_pixel = (expl.maps.inputs[0][None] * expl.maps.concepts[layer][0]).sum(dim=1).double().numpy()  # (5, S, S)
    activations = expl.activations[layer][0, expl.top_ids[layer][0]].double().numpy()

    full = engine.explain(photo, None, None, 5, None, "array", "bcos")
    data = np.array([c["heatmap"]["data"] for c in full["concepts"]])
    np.testing.assert_allclose(data, per_pixel, rtol=1e-5, atol=1e-7)

    half = engine.explain(photo, None, None, 5, None, "float32", "bcos", heatmap_size=SIZE // 2)
    entry = half["concepts"][0]["heatmap"]
    assert entry["format"] == "float32" and entry["dtype"] == "<f4" and entry["shape"] == [SIZE // 2, SIZE // 2]
    decoded = np.stack(
        [
            np.frombuffer(base64.b64decode(c["heatmap"]["data_base64"]), "<f4").reshape(c["heatmap"]["shape"])
            for c in half["concepts"]
        ]
    )
    blocks = per_pixel.reshape(5, SIZE // 2, 2, SIZE // 2, 2).sum(axis=(2, 4))
    np.testing.assert_allclose(decoded, blocks, rtol=1e-4, atol=1e-6)

    odd = engine.explain(photo, None, None, 5, None, "array", "bcos", heatmap_size=10)  # 64 is not a multiple of 10
    sums = np.array([np.sum(c["heatmap"]["data"]) for c in odd["concepts"]])
    assert odd["concepts"][0]["heatmap"]["shape"] == [10, 10]
    np.testing.assert_allclose(sums, activations, rtol=1e-4, atol=1e-6)  # a concept's map still sums to its activation


def test_spatial_heatmaps_sum_to_the_contribution_and_render_at_heatmap_size(engine, photo):
    result = engine.explain(photo, None, None, 5, None, "array", "spatial", heatmap_size=16)
    for concept in result["concepts"]:
        heatmap = concept["heatmap"]
        assert heatmap["kind"] == "spatial"
        assert np.sum(heatmap["data"]) == pytest.approx(concept["contribution"], rel=1e-4, abs=1e-6)
    expl, layer = _maps(engine, photo)
    assert result["concepts"][0]["heatmap"]["shape"] == list(expl.spatial[layer].shape[-2:])
    images = engine.explain(photo, None, None, 5, None, "webp", "spatial", heatmap_size=16)
    assert _decode(images["concepts"][0]["heatmap"]).shape == (16, 16, 4)


def test_heatmap_options_match_the_request_schema():
    assert get_args(HeatmapFormat) == engine_module.HEATMAP_FORMATS
    assert get_args(HeatmapKind) == engine_module.HEATMAP_KINDS


@pytest.mark.parametrize("bad", [7, 0, -3, SIZE + 1, 10**12, True, "32", 32.0])
def test_heatmap_size_out_of_range_is_a_400_naming_the_field_and_range(engine, photo, bad):
    with pytest.raises(RequestError) as caught:
        engine.explain(photo, None, None, 3, None, "png", "bcos", heatmap_size=bad)
    assert caught.value.status == 400 and caught.value.reason == "invalid_request"
    assert caught.value.message == (
        f"field 'heatmap_size' must be an integer in [8, {SIZE}] (pixels per side; {SIZE} is this model's input "
        f"size, the default), got {bad!r}"
    )


# --------------------------------------------------------------------------- response sizes at 224²


@pytest.fixture(scope="module")
def engine_224(tmp_path_factory):
    """A random B-cos-v2 ResNet-18 at 224 px (the ResNet-50 of docs/LOAD.md is too slow for a test)."""
    path = build_scale_artifact(
        tmp_path_factory.mktemp("scale224") / "resnet18", "bcos_v2_resnet18", [("layer4", 512, 8)], 224, 10
    )
    return Engine(path, _settings(), "resnet18", "test")


@pytest.mark.parametrize(
    ("encoding", "kind"),
    [("webp", "bcos"), ("webp", "signed"), ("webp", "spatial"), ("png8", "bcos"), ("png", "bcos")],
)
def test_top5_compact_heatmaps_at_224_fit_in_150_kB(engine_224, encoding, kind):
    photo = _photo(224)
    result = engine_224.explain(photo, None, None, 5, None, encoding, kind)
    body = json.dumps(result).encode()
    assert len(result["concepts"]) == 5 and all(c["heatmap"]["size"] == [224, 224] for c in result["concepts"])
    assert len(body) <= 150_000, len(body)
    half = json.dumps(engine_224.explain(photo, None, None, 5, None, encoding, kind, heatmap_size=112)).encode()
    assert len(half) < 0.6 * len(body), (len(half), len(body))  # a quarter of the pixels: well under half the bytes


def test_lossless_png_stays_small_where_the_map_is_transparent(engine_224):
    """B-cos colour maps are transparent where a concept did not contribute: that area costs almost nothing."""
    result = engine_224.explain(_photo(224), None, None, 5, None, "png", "bcos")
    for concept in result["concepts"]:
        rgba = _decode(concept["heatmap"])
        transparent = float((rgba[..., 3] == 0).mean())
        raw = 224 * 224 * 4
        # at most the visible pixels' raw bytes (4 per pixel), plus PNG's overhead, base64-encoded
        assert len(concept["heatmap"]["png_base64"]) <= 4 / 3 * ((1 - transparent) * raw + 0.02 * raw + 1024)


# --------------------------------------------------------------------------- /model and concept cards


def test_model_summary_reports_size_and_input_resolution(engine, artifact):
    summary = engine.model_summary()
    with safe_open(artifact / "model.safetensors", "pt") as weights:
        in_file = sum(int(np.prod(weights.get_slice(name).get_shape())) for name in weights.keys())
    saved = engine.model.state_dict()
    buffers = sum(b.numel() for name, b in engine.model.named_buffers() if name in saved)
    assert summary["size"]["parameters"] == in_file - buffers > 0  # the file holds the parameters and the buffers
    assert summary["size"]["weights_bytes"] == (artifact / "model.safetensors").stat().st_size
    assert summary["size"]["bytes_on_disk"] == sum(f.stat().st_size for f in artifact.iterdir() if f.is_file())
    assert summary["input_resolution"] == {"height": SIZE, "width": SIZE, "channels": 3}
    assert summary["heatmaps"]["size"] == {"min": 8, "max": SIZE, "default": SIZE}
    assert summary["concept_statistics"] is False


def test_cards_without_statistics_are_a_404_that_says_what_to_run(engine):
    for call in (lambda: engine.concept_list("layer3"), lambda: engine.concept_card("layer3", 0)):
        with pytest.raises(RequestError) as caught:
            call()
        assert caught.value.status == 404 and caught.value.reason == "no_statistics"
        assert caught.value.message.startswith(
            f"this model has no concept statistics, so there are no concept cards or listings; compute them with "
            f"`fact stats --model {engine.artifact_dir}`"
        )


def _copy(artifact, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(artifact, target)
    return target


def test_cards_whose_dataset_images_are_not_here_answer_with_the_numbers_and_a_reason(artifact, tmp_path):
    from fact_model.analysis.concept_stats import load_concept_stats

    path = _copy(artifact, tmp_path, "folder_stats")
    description = {"dataset": "image_folder", "root": str(tmp_path / "gone"), "split": "val", "image_size": SIZE}
    add_statistics(path, description, images=24, top=6)
    stats, _ = load_concept_stats(path)
    engine = Engine(path, _settings(), "tiny", "test")
    concept = int(stats["layer3/frequency"].argmax())
    card = engine.concept_card("layer3", concept)
    assert card["example_images"]["available"] is False and card["example_images"]["reason"] == "dataset_unreadable"
    assert str(tmp_path / "gone") in card["example_images"]["message"]
    assert card["frequency"] == pytest.approx(float(stats["layer3/frequency"][concept]))
    expected = stats["layer3/top_indices"][concept][stats["layer3/top_activations"][concept] > 0].tolist()
    assert [e["index"] for e in card["examples"]] == expected and expected
    assert all("image_png_base64" not in e for e in card["examples"])
    assert engine.model_summary()["concept_cards"] == {"layer2": True, "layer3": True}


def test_cards_show_images_from_a_folder_that_is_here_and_say_so_once_it_is_gone(artifact, tmp_path):
    from fact_model.analysis.concept_stats import compute_concept_stats, save_concept_stats
    from fact_model.artifacts import load
    from fact_model.data.sources import DataSpec, open_split

    folder = tmp_path / "images"
    generator = np.random.default_rng(0)
    for c in range(CLASSES):
        (folder / f"class_{c}").mkdir(parents=True)
        for i in range(3):
            pixels = generator.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"class_{c}" / f"{i}.png")
    path = _copy(artifact, tmp_path, "readable")
    split = open_split(DataSpec(source=str(folder), image_size=SIZE), "all")
    save_concept_stats(
        path, compute_concept_stats(load(path), split, top=4, progress=False), {"data": split.description}
    )
    engine = Engine(path, _settings(), "tiny", "test")
    card = engine.concept_card("layer3", int(engine.stats["layer3/frequency"].argmax()))
    assert card["example_images"] == {"available": True, "reason": None, "message": None}
    first = card["examples"][0]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["image_png_base64"]))).convert("RGB"))
    expected = split.images([first["index"]])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(shown, expected)  # the very image the statistics index

    shutil.rmtree(folder)
    engine = Engine(path, _settings(), "tiny", "test")
    card = engine.concept_card("layer3", int(engine.stats["layer3/frequency"].argmax()))
    assert card["example_images"]["reason"] == "dataset_unreadable" and card["examples"]


def test_statistics_of_another_model_are_refused_per_layer_not_a_500(artifact, tmp_path):
    from fact_model.analysis.concept_stats import save_concept_stats

    path = _copy(artifact, tmp_path, "stale")
    stale = {
        "layer3/frequency": torch.rand(65),  # K = 65: not this model's 64
        "layer3/class_mean_contributions": torch.rand(CLASSES, 65),
        "layer3/top_indices": torch.zeros(65, 4, dtype=torch.long),
        "layer3/top_activations": torch.rand(65, 4),
    }  # and nothing for layer2
    save_concept_stats(path, stale, {"data": None})
    engine = Engine(path, _settings(), "tiny", "test")
    for layer, words in (("layer3", "do not fit"), ("layer2", "no 'frequency'")):
        with pytest.raises(RequestError) as caught:
            engine.concept_card(layer, 0)
        assert caught.value.status == 404 and caught.value.reason == "no_statistics" and words in caught.value.message
    assert engine.model_summary()["concept_cards"] == {"layer2": False, "layer3": False}


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home_scale")
    with running_server(home, env={"FACT_ARTIFACT": str(artifact), "FACT_DEVICE": "cpu"}) as url:
        yield url


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow  # the module's `bentoml serve`
def test_http_heatmap_size_and_encodings(server, photo):
    image = base64.b64encode(_png_bytes(photo)).decode()
    status, result = post_json(f"{server}/explain", {"image_base64": image, "heatmaps": "webp", "heatmap_size": 32})
    assert status == 200, result
    assert _decode(result["concepts"][0]["heatmap"]).shape == (32, 32, 4)
    status, form = post_multipart(
        f"{server}/explain",
        {"heatmaps": "png8", "heatmap_size": "16", "top_k": "2"},
        "image",
        "x.png",
        _png_bytes(photo),
    )
    assert status == 200, form
    assert _decode(form["concepts"][0]["heatmap"]).shape == (16, 16, 4)
    status, batch = post_json(
        f"{server}/explain_batch", {"items": [{"image_base64": image}] * 2, "heatmaps": "float32", "heatmap_size": 8}
    )
    assert status == 200, batch
    assert all(r["concepts"][0]["heatmap"]["shape"] == [8, 8] for r in batch["results"])


@pytest.mark.slow  # the module's `bentoml serve`
@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("heatmap_size", SIZE + 1, f"field 'heatmap_size' must be an integer in [8, {SIZE}] (pixels per side; "),
        ("heatmap_size", 4, f"field 'heatmap_size' must be an integer in [8, {SIZE}] (pixels per side; "),
        ("heatmap_size", "32", "invalid request: field 'heatmap_size'"),  # strict: no string for an integer
        ("heatmaps", "jpeg", "invalid request: field 'heatmaps'"),
    ],
)
def test_http_bad_heatmap_options_are_400_in_the_envelope(server, photo, field, value, words):
    image = base64.b64encode(_png_bytes(photo)).decode()
    status, body = post_json(f"{server}/explain", {"image_base64": image, field: value})
    assert status == 400, body
    assert body["reason"] == "invalid_request" and body["error"].startswith(words) and body["status"] == 400, body
    status, body = post_multipart(f"{server}/explain", {"heatmap_size": "big"}, "image", "x.png", _png_bytes(photo))
    assert (status, body["reason"], body["error"]) == (
        400,
        "invalid_request",
        "field 'heatmap_size' must be an integer, got 'big'",
    ), body


@pytest.mark.slow  # the module's `bentoml serve`
def test_http_model_and_cards_without_statistics(server):
    status, model = http("GET", f"{server}/model")
    assert status == 200
    assert model["input_resolution"]["height"] == SIZE and model["size"]["parameters"] > 0
    assert model["concept_statistics"] is False
    for path in ("/concepts/layer3", "/concepts/layer3/0"):
        status, body = http("GET", f"{server}{path}")
        assert status == 404 and body["reason"] == "no_statistics" and body["status"] == 404, body
        assert (
            body["error"].startswith("this model has no concept statistics") and "`fact stats --model " in body["error"]
        )
