"""KServe V1 and Open Inference Protocol V2 (``service.protocols``), and the ``/v1`` aliases of our own API.

Three levels: the translation (request models, tensor parsing, path rewrite, route labels) as plain
functions; the protocol routes behind the real :class:`~service.gate.RequestGate` and
:class:`~service.edge.Edge` on an in-process engine (ASGI, no server); and a real ``bentoml serve``
(marked slow), where every protocol answer is compared with our own ``/predict`` and ``/explain_batch``.
Request bodies follow the published shapes (KServe's V1 data plane; ``inference_rest.md`` of the OIP).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import CLASS_NAMES, SyntheticConfig, render_sample
from service.edge import Edge, canonical_path, route_label
from service.engine import Engine
from service.errors import RequestError
from service.gate import RequestGate, decoded_image, validation_message
from service.images import decode_base64
from service.protocols import (
    Backend,
    InferRequest,
    KServeExplainRequest,
    KServePredictRequest,
    gate_routes,
    pixels_tensor,
    routes,
)
from service.settings import Settings
from tests._support.server import REPO, http, post_json, running_server

SIZE, CLASSES = 48, 10  # the default model's input size and classes
MAX_BYTES = 10 * 1024 * 1024


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(n: int, offset: int = 0) -> list[tuple[np.ndarray, int]]:
    """``n`` test images of the synthetic data the default model was trained on (pixels (48, 48, 3), label)."""
    config = SyntheticConfig()
    return [
        (render_sample(config, "test", i)[0], int(render_sample(config, "test", i)[2]))
        for i in range(offset, offset + n)
    ]


def b64(pixels: np.ndarray) -> str:
    return base64.b64encode(png_bytes(pixels)).decode()


def bytes_request(texts: list[str], **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "image", "shape": [len(texts)], "datatype": "BYTES", "data": texts}], **fields}


def pixels_request(pixels: np.ndarray, layout: str = "nchw", **fields: Any) -> dict[str, Any]:
    """An FP32 ``pixels`` request of a (N, 48, 48, 3) uint8 batch, flattened row-major."""
    values = pixels.astype(np.float32) / 255
    if layout == "nchw":
        values = values.transpose(0, 3, 1, 2)
    tensor = {"name": "pixels", "shape": list(values.shape), "datatype": "FP32", "data": values.flatten().tolist()}
    return {"inputs": [tensor], **fields}


def refusal_message(schema: type, payload: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        schema.model_validate(payload)
    return validation_message(info.value, schema)


def outputs_of(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in body["outputs"]}


# ----------------------------------------------------------------------------- translation
@pytest.mark.parametrize(
    "instance",
    ["aGVsbG8=", {"b64": "aGVsbG8="}, {"image_bytes": {"b64": "aGVsbG8="}}],
    ids=["string", "b64", "image_bytes"],
)
def test_kserve_instances_in_every_form_are_one_image(instance):
    request = KServePredictRequest.model_validate({"instances": [instance]})
    assert request.instances[0].image_bytes.b64 == "aGVsbG8="
    assert request.parameters.top_k == 5
    spec = next(spec for pattern, spec in gate_routes().items() if pattern.fullmatch("/v1/models/m:predict"))
    assert spec.images({"instances": [instance, instance]}) == ["aGVsbG8=", "aGVsbG8="]


def test_kserve_explain_instances_take_target_and_parameters():
    request = KServeExplainRequest.model_validate(
        {
            "instances": ["eA==", {"image_bytes": {"b64": "eQ=="}, "target": "circle", "contrast": 3}],
            "parameters": {"top_k": 2, "heatmaps": "array", "layers": ["layer3"]},
        }
    )
    assert [(i.image_bytes.b64, i.target, i.contrast) for i in request.instances] == [
        ("eA==", None, None),
        ("eQ==", "circle", 3),
    ]
    assert request.parameters.model_dump() == {
        "top_k": 2, "layers": ["layer3"], "heatmaps": "array", "heatmap_kind": "bcos", "heatmap_size": None,
    }  # fmt: skip
    assert KServeExplainRequest.model_validate({"instances": ["eA=="]}).parameters.heatmaps == "none"


@pytest.mark.parametrize(
    ("schema", "payload", "words"),
    [
        (KServePredictRequest, {"instances": []}, ["field 'instances'", "at least 1 item"]),
        (KServePredictRequest, {"instances": [7]}, ["field 'instances.0'", "an instance is an image", "got int"]),
        (KServePredictRequest, {"instances": [{"image": "eA=="}]}, ["field 'instances.0.image_bytes' is required"]),
        (KServePredictRequest, {"instances": [{"image_bytes": {"b64": "eA=="}, "target": 1}]},
         ["unknown field 'instances.0.target'"]),
        (KServePredictRequest, {"inputs": ["eA=="]},
         ["unknown field 'inputs' (the fields are: instances, parameters)"]),
        (KServePredictRequest, {"instances": ["eA=="], "parameters": {"top_k": "3"}}, ["field 'parameters.top_k'"]),
        (KServeExplainRequest, {"instances": ["eA=="], "parameters": {"heatmaps": "gif"}},
         ["field 'parameters.heatmaps'"]),
        (KServePredictRequest, {"instances": [""]}, ["field 'instances.0.image_bytes.b64'"]),
    ],
    ids=["empty", "number", "no-image", "target-on-predict", "columnar", "top_k", "heatmaps", "empty-image"],
)  # fmt: skip
def test_kserve_bad_bodies_are_refused_naming_the_field(schema, payload, words):
    message = refusal_message(schema, payload)
    assert message.startswith("invalid request: ")
    assert all(w in message for w in words), message


def test_infer_request_reads_the_published_shapes():
    flat = InferRequest.model_validate(bytes_request(["eA==", "eQ=="], id="42"))
    assert (flat.id, flat.top_k, flat.requested[:2]) == ("42", 5, ("logits", "probabilities"))
    nested = InferRequest.model_validate(
        {
            "inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES", "data": [["eA=="], ["eQ=="]],
                        "parameters": {"content_type": "base64"}}],
            "outputs": [{"name": "predicted_class"}, {"name": "logits", "parameters": {"binary_data": False}}],
            "parameters": {"top_k": 3},
        }
    )  # fmt: skip
    assert (nested.top_k, nested.requested) == (3, ("predicted_class", "logits"))
    spec = next(spec for pattern, spec in gate_routes().items() if pattern.fullmatch("/v2/models/m/versions/1/infer"))
    assert spec.images(nested.model_dump()) == ["eA==", "eQ=="]
    unknown_count = bytes_request(["eA==", "eQ=="])
    unknown_count["inputs"][0]["shape"] = [-1]  # KServe's examples send -1: as many as data holds
    assert InferRequest.model_validate(unknown_count).inputs[0].shape == [-1]
    assert spec.images(unknown_count) == ["eA==", "eQ=="]
    pixels = InferRequest.model_validate(pixels_request(np.zeros((1, SIZE, SIZE, 3), np.uint8), layout="nhwc"))
    assert spec.images(pixels.model_dump()) == []


def _with_input(**changes: Any) -> dict[str, Any]:
    body = bytes_request(["eA=="])
    body["inputs"][0].update(changes)
    return body


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_with_input(name="input-0"), ["inputs[0].name: unknown input 'input-0'", "'image' (BYTES", "'pixels' (FP32"]),
        (_with_input(datatype="FP32"), ["inputs[0].datatype: input 'image' is BYTES, got 'FP32'"]),
        (_with_input(shape=[1, 2]), ["inputs[0].shape: the image input has shape [N] or [N, 1]"]),
        (_with_input(shape=[2]), ["inputs[0].data holds 1 elements", "shape [2] needs 2"]),
        (_with_input(data=[5]), ["inputs[0].data[0]: each element is an image as base64 text, got int"]),
        (_with_input(parameters={"content_type": "str"}), ["inputs[0].parameters.content_type", "got 'str'"]),
        (_with_input(parameters={"binary_data_size": 100}), ["binary tensor data extension is not supported"]),
        ({**bytes_request(["eA=="]), "parameters": {"top_k": 0}}, ["parameters.top_k must be an integer in [1, "]),
        ({**bytes_request(["eA=="]), "parameters": {"topk": 3}}, ["parameters: unknown parameter 'topk'"]),
        ({**bytes_request(["eA=="]), "outputs": [{"name": "scores"}]},
         ["outputs[0].name: unknown output 'scores' (the outputs are: logits, probabilities"]),
        ({**bytes_request(["eA=="]), "outputs": [{"name": "logits"}, {"name": "logits"}]},
         ["an output is asked for more than once"]),
        ({"inputs": []}, ["field 'inputs'", "at least 1 item"]),
        ({**bytes_request(["eA=="]), "model": "x"}, ["unknown field 'model'"]),
        (pixels_request(np.zeros((1, SIZE, SIZE, 4), np.uint8), layout="nhwc"),
         ["inputs[0].shape: the pixels input has shape [N, 3, S, S] or [N, S, S, 3], got [1, 48, 48, 4]"]),
    ],
    ids=["name", "datatype", "shape", "count", "element", "content_type", "binary", "top_k", "parameter",
         "output", "duplicate", "no-input", "extra", "channels"],
)  # fmt: skip
def test_infer_bad_bodies_are_refused_naming_the_field(payload, words):
    message = refusal_message(InferRequest, payload)
    assert all(w in message for w in words), message


def test_pixels_tensor_reads_both_layouts_and_refuses_bad_values():
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    nchw = InferRequest.model_validate(pixels_request(pixels)).inputs[0]
    nhwc = InferRequest.model_validate(pixels_request(pixels, layout="nhwc")).inputs[0]
    expected = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(pixels_tensor(nchw, SIZE), expected)
    assert torch.equal(pixels_tensor(nhwc, SIZE), expected)
    natural = nchw.model_copy(update={"data": (pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2).tolist()})
    assert torch.equal(pixels_tensor(natural, SIZE), expected)

    def refused(given, size=SIZE) -> str:
        with pytest.raises(RequestError) as info:
            pixels_tensor(given, size)
        assert (info.value.status, info.value.reason) == (400, "invalid_request")
        return info.value.message

    assert "inputs[0].shape must be [N, 3, 32, 32] or [N, 32, 32, 3]" in refused(nchw, 32)
    assert "(this model's input size is 32" in refused(nchw, 32)
    assert "values in [0, 255]" in refused(nchw.model_copy(update={"data": [v * 255 for v in nchw.data]}))
    assert "got str" in refused(nchw.model_copy(update={"data": ["0.5", *nchw.data[1:]]}))
    assert "must be in [0, 1]" in refused(nchw.model_copy(update={"data": [10**400, *nchw.data[1:]]}))
    assert "got bool" in refused(nchw.model_copy(update={"data": [True, *nchw.data[1:]]}))
    assert "holds 3 elements" in refused(nchw.model_copy(update={"data": [0.5, 0.5, 0.5]}))
    ragged = natural.model_copy(update={"data": natural.data[:1]})
    assert "does not match shape [2, 3, 48, 48] at depth 0" in refused(ragged)


def test_v1_prefix_is_our_api_and_kserve_paths_stay():
    assert canonical_path("/v1/predict") == "/predict"
    assert canonical_path("/v1/explain_batch") == "/explain_batch"
    assert canonical_path("/v1/concepts/layer3/7") == "/concepts/layer3/7"
    assert canonical_path("/v1/intervene") == "/intervene"
    for kept in ("/v1/models", "/v1/models/fact-default", "/v1/models/fact-default:predict", "/v1", "/predict",
                 "/v2/models/x/infer"):  # fmt: skip
        assert canonical_path(kept) == kept


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/models", "v1/models"),
        ("/v1/models/fact-default", "v1/models/{name}"),
        ("/v1/models/fact-default:predict", "v1/models/{name}:predict"),
        ("/v1/models/fact-default:explain", "v1/models/{name}:explain"),
        ("/v2", "v2"),
        ("/v2/health/ready", "v2/health"),
        ("/v2/models/fact-default", "v2/models/{name}"),
        ("/v2/models/fact-default/versions/abc", "v2/models/{name}"),
        ("/v2/models/fact-default/ready", "v2/models/{name}/ready"),
        ("/v2/models/fact-default/versions/abc/infer", "v2/models/{name}/infer"),
        ("/v2/models/a/b/c/infer", "other"),
    ],
)
def test_protocol_routes_have_bounded_labels(path, label):
    assert route_label(path) == label


# ----------------------------------------------------------------------------- ASGI, in-process engine
@pytest.fixture(scope="module")
def engine() -> Engine:
    fixed = {"device": "cpu", "runtime": "pytorch", "max_pixels": None, "max_top_k": 20, "torch_threads": None}
    return Engine(
        resolve_artifact_path("default"), dataclasses.replace(Settings.from_env(), **fixed), "fact-default", "7"
    )


def asgi_app(engine: Engine | None, alive: bool = True) -> Edge:
    """The protocol routes behind the real gate and edge; the model "thread" runs inline."""

    async def get_engine() -> Engine:
        if engine is None:
            raise RequestError(503, "loading", "the model is still loading; retry shortly")
        return engine

    async def run(route: str, fn, *args, units: int = 1):
        return fn(*args)

    async def explain(texts, targets, contrasts, options):
        images = [decoded_image(text) for text in texts]
        return engine.explain_many(
            images, targets, contrasts, options["top_k"], options["layers"], options["heatmaps"],
            options["heatmap_kind"], 0.0, options["heatmap_size"],
        )  # fmt: skip

    backend = Backend(
        loaded=lambda: engine,
        alive=lambda: alive,
        engine=get_engine,
        run=run,
        explain=explain,
        observe=lambda endpoint, results: None,
        respond=lambda payload, endpoint: JSONResponse(payload),
    )
    gate = RequestGate(
        Starlette(routes=routes(backend)),
        gate_routes(),
        max_bytes=MAX_BYTES,
        body_timeout_s=5,
        decode=engine.decode if engine is not None else (lambda data: Image.new("RGB", (8, 8))),
        unbase64=lambda text: decode_base64(text, MAX_BYTES),
        decode_concurrency=1,
    )
    return Edge(gate, timeout_s=30)


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(asgi_app(engine)) as test_client:
        yield test_client


def test_asgi_kserve_predict_is_engine_predict(client, engine):
    images = samples(3)
    instances = [b64(images[0][0]), {"b64": b64(images[1][0])}, {"image_bytes": {"b64": b64(images[2][0])}}]
    response = client.post("/v1/models/fact-default:predict", json={"instances": instances, "parameters": {"top_k": 3}})
    assert response.status_code == 200, response.text
    expected = engine.predict([Image.fromarray(p) for p, _ in images], top_k=3)
    assert response.json() == {"predictions": json.loads(json.dumps(expected))}
    assert [p["prediction"]["index"] for p in response.json()["predictions"]] == [label for _, label in images]


def test_asgi_kserve_explain_is_engine_explain_many(client, engine):
    (first, label), (second, _) = samples(2)
    body = {"instances": [b64(first), {"image_bytes": {"b64": b64(second)}, "target": 4}], "parameters": {"top_k": 2}}
    response = client.post("/v1/models/fact-default:explain", json=body)
    assert response.status_code == 200, response.text
    explanations = response.json()["explanations"]
    assert [e["target"]["index"] for e in explanations] == [label, 4]
    expected = engine.explain_many(
        [Image.fromarray(first), Image.fromarray(second)], [None, 4], [None, None], 2, None, "none", "bcos"
    )
    for got, want in zip(explanations, expected, strict=True):
        assert got["concepts"] == json.loads(json.dumps(want["concepts"]))
        assert got["completeness"]["relative_residual"] <= 1e-4
        assert all(c["heatmap"] is None for c in got["concepts"])


def test_asgi_infer_bytes_and_pixels_agree_with_predict(client, engine):
    images = samples(2, offset=5)
    pixels = np.stack([p for p, _ in images])
    expected = engine.predict([Image.fromarray(p) for p in pixels])
    logits, _, _, _, _ = engine.predict_tensors(engine.model.preprocess([Image.fromarray(p) for p in pixels]))
    for body in (
        bytes_request([b64(p) for p in pixels], id="req-7"),
        pixels_request(pixels),
        pixels_request(pixels, "nhwc"),
    ):
        response = client.post("/v2/models/fact-default/infer", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["model_name"], answer["model_version"]) == ("fact-default", "7")
        outputs = outputs_of(answer)
        assert list(outputs) == ["logits", "probabilities", "predicted_class", "predicted_label", "top_concepts",
                                 "top_contributions"]  # fmt: skip
        assert outputs["logits"]["shape"] == [2, CLASSES] and outputs["logits"]["datatype"] == "FP32"
        assert outputs["logits"]["data"] == pytest.approx(logits.flatten().tolist(), abs=1e-5)
        assert outputs["predicted_class"] == {"name": "predicted_class", "datatype": "INT64", "shape": [2],
                                              "data": [label for _, label in images]}  # fmt: skip
        assert outputs["predicted_label"]["data"] == [CLASS_NAMES[label] for _, label in images]
        assert outputs["top_concepts"]["shape"] == [2, 5]
        ids = [[c["id"] for c in record["concepts"]] for record in expected]
        assert outputs["top_concepts"]["data"] == [i for row in ids for i in row]
        contributions = [c["contribution"] for record in expected for c in record["concepts"]]
        assert outputs["top_contributions"]["data"] == pytest.approx(contributions, rel=1e-4, abs=1e-5)
        want = engine.model.probabilities(logits).flatten().tolist()
        assert outputs["probabilities"]["data"] == pytest.approx(want, abs=1e-6)
    assert (
        client.post("/v2/models/fact-default/infer", json=bytes_request([b64(pixels[0])], id="req-7")).json()["id"]
        == "req-7"
    )


def test_asgi_infer_outputs_selection_and_generated_id(client):
    ((pixels, label),) = samples(1)
    body = bytes_request([b64(pixels)], outputs=[{"name": "top_contributions"}, {"name": "predicted_class"}])
    body["parameters"] = {"top_k": 2}
    response = client.post("/v2/models/fact-default/versions/7/infer", json=body, headers={"X-Request-ID": "abc-1"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "abc-1" and response.headers["x-request-id"] == "abc-1"
    assert [o["name"] for o in answer["outputs"]] == ["top_contributions", "predicted_class"]
    assert answer["outputs"][0]["shape"] == [1, 2] and answer["outputs"][1]["data"] == [label]


def test_asgi_metadata_readiness_and_unknown_models(client):
    assert client.get("/v1/models").json() == {"models": ["fact-default"]}
    assert client.get("/v1/models/fact-default").json() == {"name": "fact-default", "ready": True}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/fact-default/ready").json() == {"name": "fact-default", "ready": True}
    metadata = client.get("/v2/models/fact-default").json()
    assert metadata["name"] == "fact-default" and metadata["versions"] == ["7"] and metadata["platform"] == "pytorch"
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]},
    ]
    assert {o["name"]: o["shape"] for o in metadata["outputs"]}["logits"] == [-1, CLASSES]
    assert client.get("/v2").json()["name"] == "fact"
    for method, path in (
        ("GET", "/v1/models/resnet"),
        ("POST", "/v1/models/resnet:predict"),
        ("POST", "/v1/models/resnet:explain"),
        ("GET", "/v2/models/resnet"),
        ("GET", "/v2/models/resnet/ready"),
        ("POST", "/v2/models/resnet/infer"),
    ):
        body = {"instances": [b64(samples(1)[0][0])]} if ":" in path else bytes_request([b64(samples(1)[0][0])])
        response = client.request(method, path, json=body if method == "POST" else None)
        answer = response.json()
        assert (response.status_code, answer["reason"]) == (404, "unknown_model"), (path, answer)
        assert (
            answer["error"]
            == "model 'resnet' is not served here; this server serves 'fact-default' (GET /v1/models lists it)"
        )
        assert answer["request_id"] == response.headers["x-request-id"]
    response = client.get("/v2/models/fact-default/versions/8")
    assert (response.status_code, response.json()["reason"]) == (404, "unknown_version")
    assert "the served version is '7'" in response.json()["error"]


def test_asgi_bad_bodies_get_the_envelope_with_the_request_id(client):
    response = client.post(
        "/v2/models/fact-default/infer", json={"inputs": [{"name": "x"}]}, headers={"X-Request-ID": "bad-1"}
    )
    answer = response.json()
    assert response.status_code == 400 and set(answer) == {"error", "reason", "status", "request_id"}
    assert answer["request_id"] == "bad-1" == response.headers["x-request-id"]
    assert "field 'inputs.0.shape' is required" in answer["error"]
    response = client.post(
        "/v2/models/fact-default/infer", json=bytes_request([base64.b64encode(b"no image").decode()])
    )
    assert (response.status_code, response.json()["reason"]) == (400, "not_an_image")
    response = client.post(
        "/v2/models/fact-default/infer", content=b"[1]", headers={"Content-Type": "application/json"}
    )
    assert (response.status_code, response.json()["reason"]) == (400, "invalid_json")
    response = client.post(
        "/v1/models/fact-default:predict", content=b"x", headers={"Content-Type": "application/octet-stream"}
    )
    assert (response.status_code, response.json()["reason"]) == (415, "unsupported_media_type")
    response = client.post("/v2/models/fact-default/infer", json=pixels_request(np.zeros((1, 32, 32, 3), np.uint8)))
    assert response.status_code == 400 and "this model's input size is 48" in response.json()["error"]


def test_asgi_readiness_while_loading_keeps_the_protocol_fields():
    with TestClient(asgi_app(None)) as loading:
        for path, fields in (
            ("/v1/models/fact-default", {"name": "fact-default", "ready": False}),
            ("/v2/health/ready", {"ready": False}),
            ("/v2/models/fact-default/ready", {"name": "fact-default", "ready": False}),
        ):
            response = loading.get(path)
            answer = response.json()
            assert response.status_code == 503 and answer["reason"] == "loading", (path, answer)
            assert fields.items() <= answer.items() and answer["request_id"] == response.headers["x-request-id"]
        assert loading.get("/v2/health/live").json() == {"live": True}
        assert loading.get("/v1/models").json() == {"models": []}
    with TestClient(asgi_app(None, alive=False)) as failed:
        response = failed.get("/v2/health/live")
        assert response.status_code == 503 and response.json()["live"] is False
        assert response.json()["reason"] == "load_failed"


# ----------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(REPO)}
    stored = subprocess.run([sys.executable, "-m", "service.store"], env=env, cwd=REPO, capture_output=True, text=True)
    assert stored.returncode == 0, stored.stderr
    with running_server(home) as url:
        yield url


def _model_name(server: str) -> str:
    status, model = http("GET", f"{server}/model")
    assert status == 200, model
    return model["name"]


@pytest.mark.slow
def test_server_kserve_v1_equals_our_predict_and_explain_batch(server):
    name = _model_name(server)
    images = samples(3, offset=20)
    texts = [b64(p) for p, _ in images]
    status, ours = post_json(f"{server}/predict", {"images": [{"image_base64": t} for t in texts]})
    assert status == 200, ours
    instances = [texts[0], {"b64": texts[1]}, {"image_bytes": {"b64": texts[2]}}]
    status, kserve = post_json(f"{server}/v1/models/{name}:predict", {"instances": instances})
    assert status == 200, kserve
    assert [p["prediction"]["index"] for p in kserve["predictions"]] == [label for _, label in images]
    for got, want in zip(kserve["predictions"], ours, strict=True):
        assert [c["id"] for c in got["concepts"]] == [c["id"] for c in want["concepts"]]
        assert [c["logit"] for c in got["top_classes"]] == pytest.approx(
            [c["logit"] for c in want["top_classes"]], abs=1e-5
        )
    status, ours = post_json(f"{server}/explain_batch", {"items": [{"image_base64": t} for t in texts[:2]], "top_k": 3})
    assert status == 200, ours
    status, kserve = post_json(
        f"{server}/v1/models/{name}:explain", {"instances": texts[:2], "parameters": {"top_k": 3}}
    )
    assert status == 200, kserve
    assert set(kserve) == {"explanations"}
    for got, want in zip(kserve["explanations"], ours["results"], strict=True):
        assert got["prediction"]["index"] == want["prediction"]["index"]
        assert [c["id"] for c in got["concepts"]] == [c["id"] for c in want["concepts"]]
        assert got["explained"] == pytest.approx(want["explained"], abs=1e-5)


@pytest.mark.slow
def test_server_oip_v2_infer_bytes_and_fp32_equal_our_predict(server):
    name = _model_name(server)
    images = samples(2, offset=40)
    texts = [b64(p) for p, _ in images]
    status, ours = post_json(f"{server}/predict", {"images": [{"image_base64": t} for t in texts]})
    assert status == 200, ours
    pixels = np.stack([p for p, _ in images])
    for body in (bytes_request(texts, id="oip-1"), pixels_request(pixels, id="oip-1")):
        status, answer = post_json(f"{server}/v2/models/{name}/infer", body)
        assert status == 200, answer
        assert answer["id"] == "oip-1" and answer["model_name"] == name
        outputs = outputs_of(answer)
        assert outputs["predicted_class"]["data"] == [r["prediction"]["index"] for r in ours]
        logits = np.asarray(outputs["logits"]["data"]).reshape(2, CLASSES)
        for row, record in zip(logits, ours, strict=True):
            for entry in record["top_classes"]:
                assert row[entry["index"]] == pytest.approx(entry["logit"], abs=1e-4)
        top = np.asarray(outputs["top_concepts"]["data"]).reshape(2, 5)
        assert top.tolist() == [[c["id"] for c in r["concepts"]] for r in ours]


@pytest.mark.slow
def test_server_health_metadata_and_unknown_model(server):
    name = _model_name(server)
    assert http("GET", f"{server}/v1/models") == (200, {"models": [name]})
    assert http("GET", f"{server}/v1/models/{name}") == (200, {"name": name, "ready": True})
    assert http("GET", f"{server}/v2/health/live") == (200, {"live": True})
    assert http("GET", f"{server}/v2/health/ready") == (200, {"ready": True})
    assert http("GET", f"{server}/v2/models/{name}/ready") == (200, {"name": name, "ready": True})
    status, metadata = http("GET", f"{server}/v2/models/{name}")
    assert status == 200 and [i["name"] for i in metadata["inputs"]] == ["image", "pixels"]
    status, server_metadata = http("GET", f"{server}/v2")
    assert status == 200 and server_metadata["name"] == "fact" and server_metadata["extensions"] == []
    for method, path in (("GET", "/v1/models/nope"), ("POST", "/v2/models/nope/infer")):
        body = json.dumps(bytes_request([b64(samples(1)[0][0])])).encode() if method == "POST" else None
        status, answer = http(method, f"{server}{path}", body, {"Content-Type": "application/json"})
        assert (status, answer["reason"]) == (404, "unknown_model"), answer
        assert f"this server serves {name!r}" in answer["error"]
    status, spec = http("GET", f"{server}/docs.json")
    assert status == 200
    for path in (
        "/v1/models/{name}:predict",
        "/v1/models/{name}:explain",
        "/v2/models/{name}/infer",
        "/v2/health/ready",
    ):
        assert path in spec["paths"], path


@pytest.mark.slow
def test_server_bad_bodies_and_request_ids(server):
    name = _model_name(server)
    status, answer = http(
        "POST", f"{server}/v1/models/{name}:predict", b'{"instances": [3]}',
        {"Content-Type": "application/json", "X-Request-ID": "given-42"},
    )  # fmt: skip
    assert (status, answer["reason"], answer["request_id"]) == (400, "invalid_request", "given-42"), answer
    assert "field 'instances.0'" in answer["error"] and "an instance is an image" in answer["error"]
    status, answer = http(
        "POST", f"{server}/v2/models/{name}/infer", b'{"inputs": []}', {"Content-Type": "application/json"}
    )
    assert status == 400 and len(answer["request_id"]) == 32, answer  # generated
    import urllib.request

    body = json.dumps(bytes_request([b64(samples(1)[0][0])])).encode()
    request = urllib.request.Request(
        f"{server}/v2/models/{name}/infer", data=body, method="POST",
        headers={"Content-Type": "application/json", "X-Request-ID": "trace-9"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["X-Request-ID"] == "trace-9"
        assert json.loads(response.read())["id"] == "trace-9"  # no id in the body: the request's id
    with urllib.request.urlopen(f"{server}/v2/health/ready", timeout=30) as response:
        assert len(response.headers["X-Request-ID"]) == 32


@pytest.mark.slow
def test_server_v1_prefix_serves_our_own_api(server):
    ((pixels, label),) = samples(1, offset=60)
    payload = {"images": [{"image_base64": b64(pixels)}]}
    assert post_json(f"{server}/v1/predict", payload) == post_json(f"{server}/predict", payload)
    assert http("GET", f"{server}/v1/model") == http("GET", f"{server}/model")
    status, listing = http("GET", f"{server}/v1/concepts/layer3")
    assert status == 200 and len(listing["concepts"]) == 256
    status, result = post_json(f"{server}/v1/explain", {"image_base64": b64(pixels), "heatmaps": "none"})
    assert status == 200 and result["prediction"]["index"] == label
    status, metrics = http("GET", f"{server}/metrics")
    text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
    assert 'route="v2/models/{name}/infer"' in text or 'route="v1/models/{name}"' in text
    assert 'route="predict"' in text
