"""The BentoML service over real HTTP: a `bentoml serve` subprocess on a free loopback port."""

from __future__ import annotations

import base64
import io
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from fact_model.data.synthetic import CLASS_NAMES, SyntheticConfig, render_sample
from tests._support.server import REPO, http, post_json, post_multipart, running_server

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.slow,
]  # a real `bentoml serve` per module


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_images(n: int, offset: int = 0) -> list[tuple[bytes, int]]:
    config = SyntheticConfig()
    return [
        (png_bytes(render_sample(config, "test", i)[0]), render_sample(config, "test", i)[2])
        for i in range(offset, offset + n)
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metrics_text(url: str) -> str:
    status, body = http("GET", f"{url}/metrics")
    assert status == 200
    return body.decode() if isinstance(body, bytes) else str(body)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"metric {name} {labels} not found"
    return total


@pytest.fixture(scope="module")
def bentoml_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "service.store"], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fact-default:")
    return home


@pytest.fixture(scope="module")
def server(bentoml_home):
    with running_server(bentoml_home) as url:
        yield url


def test_explain_is_accurate_exact_and_complete(server):
    samples = sample_images(40)
    correct = 0
    for i, (data, label) in enumerate(samples):
        if i % 2:
            status, result = post_multipart(f"{server}/explain", {"top_k": "5"}, "image", f"{i}.png", data)
        else:
            status, result = post_json(f"{server}/explain", {"image_base64": b64(data), "top_k": 5})
        assert status == 200, result
        correct += result["prediction"]["index"] == label
        explained = result["explained"]
        total = sum(c["contribution"] for c in result["concepts"]) + result["other"]["contribution"]
        assert total == pytest.approx(result["prediction"]["logit"] - result["logit_bias"], rel=1e-4, abs=1e-5)
        assert total == pytest.approx(explained, rel=1e-4, abs=1e-5)
        assert result["completeness"]["relative_residual"] <= 1e-4
        assert result["faithfulness"] == {"method": "fact", "exact": True}
        assert len(result["concepts"]) == 5 and all(c["children"] for c in result["concepts"])
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["concepts"][0]["heatmap"]["png_base64"])))
        assert heatmap.size == Image.open(io.BytesIO(data)).size and heatmap.mode == "RGBA"
        assert result["model"]["weights_sha256"] and result["model"]["name"] == "fact-default"
        assert result["model"]["version"] != "shipped"  # served from the BentoML model store
        assert set(result["timings_ms"]) >= {"preprocess", "forward", "backward", "render"}
    assert correct / len(samples) >= 0.95


def test_explain_contrast_layers_array_and_batch(server):
    (data, label), (data2, label2) = sample_images(2)
    status, result = post_json(
        f"{server}/explain",
        {"image_base64": b64(data), "target": CLASS_NAMES[label], "contrast": (label + 1) % 10, "heatmaps": "array",
         "layers": ["layer3"], "top_k": 3},
    )  # fmt: skip
    assert status == 200, result
    assert result["contrast"]["index"] == (label + 1) % 10 and result["concepts"][0]["children"] == []
    heatmap = result["concepts"][0]["heatmap"]
    assert heatmap["shape"] == [48, 48]
    assert sum(map(sum, heatmap["data"])) == pytest.approx(result["concepts"][0]["activation"], rel=1e-3)
    status, batch = post_json(
        f"{server}/explain_batch",
        {"items": [{"image_base64": b64(data)}, {"image_base64": b64(data2), "target": 4}], "top_k": 2},
    )
    assert status == 200, batch
    first, second = batch["results"]
    assert first["target"]["index"] == label and second["target"]["index"] == 4
    assert all(r["completeness"]["relative_residual"] <= 1e-4 for r in batch["results"])


def test_predict_batches_concurrent_requests_consistently(server):
    samples = sample_images(24, offset=100)
    singles = [post_json(f"{server}/predict", {"images": [{"image_base64": b64(d)}]})[1][0] for d, _ in samples[:8]]
    before = metrics_text(server)
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(
            pool.map(lambda s: post_json(f"{server}/predict", {"images": [{"image_base64": b64(s[0])}]}), samples)
        )
    assert all(status == 200 for status, _ in responses)
    predictions = [body[0]["prediction"]["index"] for _, body in responses]
    assert predictions[:8] == [s["prediction"]["index"] for s in singles]
    assert sum(p == label for p, (_, label) in zip(predictions, samples, strict=True)) >= 22
    after = metrics_text(server)
    # fact_batch_size{endpoint="predict"}: images per model call, i.e. the sizes of the adaptive batches
    batches = metric_value(after, "fact_batch_size_count", endpoint="predict") - metric_value(
        before, "fact_batch_size_count", endpoint="predict"
    )
    items = metric_value(after, "fact_batch_size_sum", endpoint="predict") - metric_value(
        before, "fact_batch_size_sum", endpoint="predict"
    )
    assert items == len(samples) and batches < len(samples), (items, batches)  # some batch held > 1 request
    concepts = responses[0][1][0]["concepts"]
    assert len(concepts) == 5 and all(c["layer"] == "layer3" for c in concepts)


def test_model_and_concept_cards(server):
    status, model = http("GET", f"{server}/model")
    assert status == 200 and model["classes"] == list(CLASS_NAMES)
    assert [layer["name"] for layer in model["concept_layers"]] == ["layer2", "layer3"]
    assert model["evaluation"]["fact_accuracy"] >= 0.95
    status, listing = http("GET", f"{server}/concepts/layer3")
    assert status == 200 and len(listing["concepts"]) == 256
    concept = max(listing["concepts"], key=lambda c: c["top_class_mean_contribution"])["id"]
    status, card = http("GET", f"{server}/concepts/layer3/{concept}")
    assert status == 200 and card["supports"] and len(card["examples"]) == 6
    thumbnail = Image.open(io.BytesIO(base64.b64decode(card["examples"][0]["heatmap_png_base64"])))
    assert thumbnail.size == (48, 48)
    status, body = http("GET", f"{server}/concepts/layer9")
    assert (status, body["status"], body["reason"]) == (404, 404, "unknown_layer"), body
    assert body["error"] == "no concept layer 'layer9'; concept layers: ['layer2', 'layer3']"
    status, body = http("GET", f"{server}/concepts/layer3/99999")
    assert (status, body["status"], body["reason"]) == (404, 404, "unknown_concept"), body
    assert body["error"] == "concept id 99999 is out of range [0, 255] for 'layer3'"


def _decompression_bomb() -> bytes:
    """A valid-looking PNG header claiming 20000×20000 pixels, a few hundred bytes long."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_bad_input_gets_clear_4xx_and_server_keeps_serving(server):
    ((data, label),) = sample_images(1)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(jpeg, format="JPEG")
    cases = {
        "empty body": http("POST", f"{server}/explain", b"", {"Content-Type": "application/json"}),
        "non-image": post_json(f"{server}/explain", {"image_base64": b64(b"hello, not an image")}),
        "truncated jpeg": post_json(
            f"{server}/explain", {"image_base64": b64(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])}
        ),
        "bomb": post_multipart(f"{server}/explain", {}, "image", "bomb.png", _decompression_bomb()),
        "unknown class": post_json(f"{server}/explain", {"image_base64": b64(data), "target": "zebra"}),
        "top_k": post_json(f"{server}/explain", {"image_base64": b64(data), "top_k": 0}),
        "layer": post_json(f"{server}/explain", {"image_base64": b64(data), "layers": ["layer9"]}),
        "base64": post_json(f"{server}/explain", {"image_base64": "***not base64***"}),
        "content type": http("POST", f"{server}/explain", b"hello", {"Content-Type": "text/plain"}),
        "oversized": http("POST", f"{server}/explain", b"x" * (11 * 1024 * 1024), {"Content-Type": "application/json"}),
        "predict non-image": post_json(f"{server}/predict", {"images": [{"image_base64": b64(b"nope")}]}),
    }
    accepted = "JPEG, PNG, WebP, GIF, BMP, TIFF"
    expected = {  # name → (status, reason, what the message says)
        "empty body": (400, "empty_body", ["the request body is empty: send a JSON object"]),
        "non-image": (400, "not_an_image", [f"the data is not a readable image (accepted formats: {accepted})"]),
        "truncated jpeg": (400, "corrupt_image", ["truncated"]),
        # beyond twice Pillow's own limit: its header check refuses it (service.images checks smaller ones)
        "bomb": (400, "too_many_pixels", ["the image has too many pixels", "400000000 pixels"]),
        "unknown class": (
            400,
            "unknown_class",
            ["unknown target class 'zebra': use a class index in [0, 9] or a class name (GET /model lists"],
        ),
        "top_k": (400, "invalid_request", ["field 'top_k'", "greater than or equal to 1"]),
        "layer": (
            400,
            "unknown_layer",
            ["unknown concept layer(s) 'layer9'; this model's concept layers: ['layer2', 'layer3']"],
        ),
        "base64": (400, "bad_base64", ["character '*' at position 0"]),
        "content type": (415, "unsupported_media_type", ["'text/plain'", "application/json", "multipart/form-data"]),
        "oversized": (413, "too_large", [f"exceeds the limit of {10 * 1024 * 1024} bytes"]),
        "predict non-image": (
            400,
            "not_an_image",
            [f"the data is not a readable image (accepted formats: {accepted})"],
        ),
    }
    assert set(expected) == set(cases)
    wrong = []
    for name, (status, body) in cases.items():
        want_status, want_reason, words = expected[name]
        if not (
            status == want_status
            and isinstance(body, dict)
            and set(body) == {"error", "reason", "status", "request_id"}
            and (body["status"], body["reason"]) == (want_status, want_reason)
            and all(w in body["error"] for w in words)
        ):
            wrong.append((name, status, body))
    assert not wrong, wrong
    status, result = post_json(f"{server}/explain", {"image_base64": b64(data)})
    assert status == 200 and result["prediction"]["index"] == label
    text = metrics_text(server)
    assert metric_value(text, "fact_rejected_requests_total", reason="too_many_pixels") >= 1
    assert metric_value(text, "fact_rejected_requests_total", reason="too_large") >= 1


def test_custom_metrics_after_traffic(server):
    ((data, _),) = sample_images(1)
    for _ in range(3):
        assert post_json(f"{server}/explain", {"image_base64": b64(data)})[0] == 200
    text = metrics_text(server)
    for stage in ("preprocess", "forward", "backward", "render", "encode"):
        assert metric_value(text, "fact_explain_stage_seconds_count", endpoint="explain", stage=stage) >= 3
    assert 0 < metric_value(text, "fact_explain_stage_seconds_sum", endpoint="explain", stage="backward") < 60
    assert metric_value(text, "fact_completeness_relative_residual_bucket", le="0.0001") >= 3
    assert metric_value(text, "fact_active_concepts_count", layer="layer3") >= 3
    assert metric_value(text, "fact_response_bytes_sum", endpoint="explain") > 3 * 1000
    assert metric_value(text, "fact_batch_size_count", endpoint="explain") >= 3
    assert metric_value(text, "fact_model_info", device="cpu") == 1


def test_two_workers_aggregate_metrics(bentoml_home):
    ((data, _),) = sample_images(1)
    # This test is about metrics aggregated over two workers, not load shedding (tests/test_limits.py,
    # tests/test_hardening.py): a generous queue budget keeps a slow spell of a shared 2-core machine during the
    # two workers' simultaneous warm-up from turning into 503s here.
    with running_server(bentoml_home, env={"FACT_WORKERS": "2", "FACT_QUEUE_BUDGET": "60"}) as url:
        with ThreadPoolExecutor(max_workers=4) as pool:
            statuses = list(
                pool.map(
                    lambda _: post_json(f"{url}/explain", {"image_base64": b64(data), "heatmaps": "none"})[0], range(12)
                )
            )
        assert statuses == [200] * 12
        text = metrics_text(url)
        assert metric_value(text, "fact_batch_size_count", endpoint="explain") == 12
        assert metric_value(text, "fact_model_info", device="cpu") == 1


def test_bentoml_build_packs_the_model(bentoml_home):
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "PYTHONPATH": str(REPO)}
    build = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO)], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr
    show = subprocess.run(
        [sys.executable, "-m", "bentoml", "get", "fact:latest", "-o", "json"], env=env, capture_output=True, text=True
    )
    assert show.returncode == 0, show.stderr
    assert "fact-default" in show.stdout
