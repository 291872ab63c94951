"""Interventions, region queries and concept labels against a real ``bentoml serve`` (issue 17).

Numbers are compared with the library run in the test process on the same artifact; label writes
with and without the bearer token, concurrent writers, a restart and another model's label file.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fact_model.artifacts import load, resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, render_sample
from tests._support.server import running_server

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]

TOKEN = "test-admin-token-0123456789"
SIZE = 48


def png_b64(index: int = 0) -> str:
    buffer = io.BytesIO()
    Image.fromarray(render_sample(SyntheticConfig(), "test", index)[0]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A private copy of the default model, so its label file lives in the test's folder."""
    path = tmp_path_factory.mktemp("artifact") / "default"
    shutil.copytree(resolve_artifact_path("default"), path)
    return path


def serve(tmp_path_factory, artifact: Path, **env: str):
    home = tmp_path_factory.mktemp("bentoml")
    return running_server(home, env={"FACT_ARTIFACT": str(artifact), "FACT_DEVICE": "cpu", **env})


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifact):
    with serve(tmp_path_factory, artifact, FACT_ADMIN_TOKEN=TOKEN) as url:
        yield url


def call(method: str, url: str, payload: object | None = None, token: str | None = None):
    """``(status, headers with lower-case names, parsed JSON body)`` of one request."""
    body = None if payload is None else json.dumps(payload).encode()
    sent = {"Content-Type": "application/json"}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, headers, data = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, data = err.code, err.headers, err.read()
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(data) if data else None


def local_model(artifact: Path):
    model = load(artifact)
    image = Image.open(io.BytesIO(base64.b64decode(png_b64())))
    return model, model.preprocess([image])


# ----------------------------------------------------------------------------- /intervene
def test_intervene_equals_the_library_and_reports_the_linear_prediction(server, artifact):
    status, _, body = call("POST", f"{server}/intervene", {"image_base64": png_b64(), "remove_top": 3})
    assert status == 200, body
    model, batch = local_model(artifact)
    iv = model.intervene(batch, remove_top=3)
    assert body["change"]["predicted"] == pytest.approx(float(iv.predicted_change[0]), rel=1e-4)
    assert body["change"]["measured"] == pytest.approx(float(iv.measured_change[0]), rel=1e-4, abs=1e-5)
    assert sorted(e["concept"] for e in body["edits"]) == sorted(iv.before.top_ids[iv.layer][0, :3].tolist())
    assert body["after"]["explained"] == pytest.approx(float(iv.after.explained[0]), rel=1e-4, abs=1e-5)
    assert body["after"]["completeness"]["relative_residual"] < 1e-4
    assert all("label" in e for e in body["edits"])


@pytest.mark.parametrize(
    ("payload", "reason", "fragment"),
    [
        ({"remove": [100000]}, "bad_intervention", "100000"),
        ({"remove_top": 1, "keep_top": 1}, "bad_intervention", "keep_top"),
        ({"scale": [{"concept": 1, "factor": 0.5}, {"concept": 1, "factor": 2}]}, "bad_intervention", "more than"),
        ({"layer": "nope", "remove": [1]}, "unknown_layer", "'nope'"),
        ({"remove": [-1]}, "invalid_request", "remove"),
        ({"scale": [{"concept": 1, "factor": "x"}]}, "invalid_request", "factor"),
        ({"removes": [1]}, "invalid_request", "removes"),
    ],
)
def test_intervene_refuses_bad_edits(server, payload, reason, fragment):
    status, headers, body = call("POST", f"{server}/intervene", {"image_base64": png_b64(), **payload})
    assert status == 400, body
    assert body["reason"] == reason and fragment in body["error"]
    assert body["request_id"] == headers["x-request-id"]


# ----------------------------------------------------------------------------- regions
def test_region_box_and_where_over_http(server, artifact):
    payload = {"image_base64": png_b64(), "heatmaps": "none", "region": {"box": {"x0": 0, "y0": 0, "x1": 24, "y1": 48}}}
    status, _, left = call("POST", f"{server}/explain", payload)
    assert status == 200, left
    payload["region"]["box"] = {"x0": 24, "y0": 0, "x1": 48, "y1": 48}
    right = call("POST", f"{server}/explain", payload)[2]
    assert left["region"]["total"] + right["region"]["total"] == pytest.approx(left["explained"], rel=1e-4)
    model, batch = local_model(artifact)
    from fact_model.regions import box_mask, region_contributions

    expl = model.explain(batch, top_k=0)
    expected = region_contributions(expl, left["region"]["layer"], box_mask((0, 0, 24, 48), (SIZE, SIZE)))
    assert left["region"]["total"] == pytest.approx(float(expected.total[0]), rel=1e-4, abs=1e-5)
    top = left["concepts"][0]["id"]
    where = call("POST", f"{server}/explain", {"image_base64": png_b64(), "heatmaps": "array", "where": {"id": top}})[
        2
    ]["where"]
    assert np.asarray(where["heatmap"]["data"]).sum() == pytest.approx(left["concepts"][0]["contribution"], rel=1e-4)


def test_region_mask_image_over_http(server):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, :24] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    payload = {"image_base64": png_b64(), "heatmaps": "none"}
    by_mask = call(
        "POST",
        f"{server}/explain",
        {**payload, "region": {"mask_base64": base64.b64encode(buffer.getvalue()).decode()}},
    )[2]
    by_box = call("POST", f"{server}/explain", {**payload, "region": {"box": {"x0": 0, "y0": 0, "x1": 24, "y1": 48}}})[
        2
    ]
    assert by_mask["region"]["total"] == pytest.approx(by_box["region"]["total"], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize(
    ("region", "reason", "fragment"),
    [
        ({"box": {"x0": 10, "y0": 0, "x1": 5, "y1": 9}}, "bad_region", "region"),
        ({"box": {"x0": 100, "y0": 100, "x1": 120, "y1": 120}}, "bad_region", "region"),
        ({}, "invalid_request", "exactly one"),
        ({"box": {"x0": 0, "y0": 0, "x1": 5}}, "invalid_request", "y1"),
        ({"mask_base64": "not an image"}, None, ""),
    ],
)
def test_bad_regions_are_refused_over_http(server, region, reason, fragment):
    status, _, body = call("POST", f"{server}/explain", {"image_base64": png_b64(), "region": region})
    assert status in (400, 415, 422), body
    if reason is not None:
        assert body["reason"] == reason and fragment in body["error"]


# ----------------------------------------------------------------------------- labels
def test_label_writes_need_the_token(server):
    url = f"{server}/concepts/layer3/5/label"
    status, headers, body = call("PUT", url, {"label": "stripes"})
    assert status == 401 and body["reason"] == "unauthorized" and "Bearer" in headers["www-authenticate"]
    status, _, body = call("PUT", url, {"label": "stripes"}, token="wrong-token-wrong-token")
    assert status == 403 and body["reason"] == "forbidden"
    status, _, body = call("PUT", url, {"label": "stripes", "note": "diagonal"}, token=TOKEN)
    assert status == 200 and body["label"] == "stripes"
    status, _, body = call("GET", url)
    assert status == 200 and body["note"] == "diagonal"
    status, _, body = call("PUT", f"{server}/concepts/layer3/99999/label", {"label": "x"}, token=TOKEN)
    assert status == 404 and body["reason"] == "unknown_concept"


def test_labels_appear_in_every_response(server):
    explained = call("POST", f"{server}/explain", {"image_base64": png_b64(), "heatmaps": "none"})[2]
    top = explained["concepts"][0]
    assert (
        call("PUT", f"{server}/concepts/{top['layer']}/{top['id']}/label", {"label": "top one"}, token=TOKEN)[0] == 200
    )
    explained = call("POST", f"{server}/explain", {"image_base64": png_b64(), "heatmaps": "none"})[2]
    assert explained["concepts"][0]["label"]["label"] == "top one"
    predicted = call("POST", f"{server}/predict", {"images": [{"image_base64": png_b64()}]})[2]
    labelled = {c["id"]: c["label"] for c in predicted[0]["concepts"]}
    assert labelled[top["id"]]["label"] == "top one"
    card = call("GET", f"{server}/concepts/{top['layer']}/{top['id']}")[2]
    assert card["label"]["label"] == "top one"


def test_concurrent_label_writes_lose_nothing(server):
    errors: list[object] = []

    def write(concept: int) -> None:
        for edit in range(5):
            status, _, body = call(
                "PUT", f"{server}/concepts/layer2/{concept}/label", {"label": f"c{concept} e{edit}"}, token=TOKEN
            )
            if status != 200:
                errors.append(body)

    threads = [threading.Thread(target=write, args=(c,)) for c in range(10, 18)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    exported = call("GET", f"{server}/labels")[2]
    layer = exported["layers"]["layer2"]
    for concept in range(10, 18):
        assert layer[str(concept)]["label"] == f"c{concept} e4"
        assert layer[str(concept)]["version"] == 5 and len(layer[str(concept)]["history"]) == 4


def test_labels_survive_a_restart_and_another_models_file_is_refused(tmp_path_factory, server, artifact):
    call("PUT", f"{server}/concepts/layer3/7/label", {"label": "kept"}, token=TOKEN)
    with serve(tmp_path_factory, artifact) as second:  # no token: reads work, writes are disabled
        assert call("GET", f"{second}/concepts/layer3/7/label")[2]["label"] == "kept"
        status, _, body = call("PUT", f"{second}/concepts/layer3/7/label", {"label": "x"}, token=TOKEN)
        assert status == 403 and body["reason"] == "writes_disabled" and "FACT_ADMIN_TOKEN" in body["error"]
    exported = call("GET", f"{server}/labels")[2]
    stale = {**exported, "model_sha256": "0" * 64}
    status, _, body = call("PUT", f"{server}/labels", stale, token=TOKEN)
    assert status == 409 and body["reason"] == "stale_labels"
    assert call("GET", f"{server}/concepts/layer3/7/label")[2]["label"] == "kept"


def test_model_summary_reports_labels(server):
    summary = call("GET", f"{server}/model")[2]
    assert summary["concept_labels"]["writes"] == "enabled" and summary["concept_labels"]["problem"] is None
    assert summary["concept_labels"]["count"] >= 1
