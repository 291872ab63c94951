"""service.labels over a plain Starlette app (no BentoML): auth, every route, and each refusal's status,
reason and message in the one error envelope."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from fact_model.concept_labels import FORMAT, LabelStore
from service.errors import RequestError
from service.labels import admin_check, label_routes

SHA = "a" * 64
OTHER_SHA = "b" * 64
LAYERS = {"layer2": 128, "layer3": 256}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 4096


@pytest.fixture
def store(tmp_path):
    return LabelStore(tmp_path / "concept_labels.json", SHA, LAYERS)


def _client(store: LabelStore, token: str | None = TOKEN) -> TestClient:
    async def get_store() -> LabelStore:
        return store

    return TestClient(Starlette(routes=label_routes(get_store, token, MAX_BODY)))


@pytest.fixture
def client(store):
    return _client(store)


def _error(response, status: int, reason: str, message: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "reason", "status"} and body["status"] == status
    assert body["reason"] == reason, body
    if message is not None:
        assert message in body["error"], body["error"]
    return body


# ---------------------------------------------------------------------------- auth
def test_admin_check_cases():
    admin_check(f"Bearer {TOKEN}", TOKEN)
    admin_check(f"bearer   {TOKEN} ", TOKEN)  # the scheme is case-insensitive
    with pytest.raises(RequestError) as info:
        admin_check(f"Bearer {TOKEN}", None)
    assert (info.value.status, info.value.reason) == (403, "writes_disabled")
    assert "FACT_ADMIN_TOKEN" in info.value.message
    for header in (None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", TOKEN):
        with pytest.raises(RequestError) as info:
            admin_check(header, TOKEN)
        assert (info.value.status, info.value.reason) == (401, "unauthorized"), header
        assert info.value.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", "Bearer s3cret-tökén"):
        with pytest.raises(RequestError) as info:
            admin_check(wrong, TOKEN)
        assert (info.value.status, info.value.reason) == (403, "forbidden")


def test_writes_need_the_bearer_token(client, store):
    url = "/concepts/layer3/131/label"
    response = client.put(url, json={"label": "x"})
    _error(response, 401, "unauthorized", "Authorization: Bearer")
    assert response.headers["www-authenticate"].startswith("Bearer")
    _error(client.put(url, json={"label": "x"}, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    _error(client.delete(url), 401, "unauthorized")
    _error(client.put("/labels", json={}, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    assert store.all()["layer3"] == {}


def test_without_a_token_writes_are_disabled_and_reads_stay_open(store):
    store.put("layer3", 131, "striped texture")
    client = _client(store, token=None)
    for response in (
        client.put("/concepts/layer3/131/label", json={"label": "x"}, headers=AUTH),
        client.delete("/concepts/layer3/131/label", headers=AUTH),
        client.put("/labels", json={}, headers=AUTH),
    ):
        _error(response, 403, "writes_disabled", "set FACT_ADMIN_TOKEN")
    assert client.get("/concepts/layer3/131/label").json()["label"] == "striped texture"
    assert client.get("/labels").status_code == 200


def test_auth_comes_before_the_body_is_read(client):
    response = client.put(
        "/concepts/layer3/1/label", content=b"x" * (MAX_BODY + 1), headers={"Content-Type": "text/plain"}
    )
    _error(response, 401, "unauthorized")


# ---------------------------------------------------------------------------- good requests
def test_put_get_delete(client):
    url = "/concepts/layer3/131/label"
    _error(client.get(url), 404, "no_label", "layer3 concept 131 has no label")
    response = client.put(url, json={"label": " striped texture ", "note": "fur", "author": "ana"}, headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    saved = response.json()
    assert {k: saved[k] for k in ("layer", "concept", "label", "note", "version", "author", "history")} == {
        "layer": "layer3",
        "concept": 131,
        "label": "striped texture",
        "note": "fur",
        "version": 1,
        "author": "ana",
        "history": [],
    }
    assert client.get(url).json() == saved
    second = client.put(url, json={"label": "stripes", "expected_version": 1}, headers=AUTH).json()
    assert second["version"] == 2 and second["history"][0]["label"] == "striped texture"
    deleted = client.delete(url + "?author=ben", headers=AUTH)
    assert deleted.status_code == 200
    assert deleted.json()["label"] == "" and deleted.json()["version"] == 3 and deleted.json()["author"] == "ben"
    _error(client.get(url), 404, "no_label")
    _error(client.delete(url, headers=AUTH), 404, "no_label", "no label to delete")


def test_delete_with_expected_version(client):
    url = "/concepts/layer2/0/label"
    client.put(url, json={"label": "x"}, headers=AUTH)
    _error(client.delete(url + "?expected_version=5", headers=AUTH), 409, "label_conflict", "at version 1")
    _error(client.delete(url + "?expected_version=one", headers=AUTH), 400, "invalid_request", "expected_version")
    assert client.delete(url + "?expected_version=1", headers=AUTH).status_code == 200


def test_export_and_import(client, store, tmp_path):
    client.put("/concepts/layer2/1/label", json={"label": "one"}, headers=AUTH)
    client.put("/concepts/layer3/2/label", json={"label": "two"}, headers=AUTH)
    exported = client.get("/labels").json()
    assert exported["format"] == FORMAT and exported["model_sha256"] == SHA
    assert exported == store.export()

    fresh = LabelStore(tmp_path / "fresh.json", SHA, LAYERS)
    other = _client(fresh)
    response = other.put("/labels", json=exported, headers=AUTH)
    assert response.json() == {"mode": "merge", "added": 2, "updated": 0, "unchanged": 0, "removed": 0}
    assert other.get("/concepts/layer3/2/label").json()["label"] == "two"

    only_one = {**exported, "layers": {"layer2": exported["layers"]["layer2"]}}
    response = other.put("/labels?mode=replace", json=only_one, headers=AUTH)
    assert response.json() == {"mode": "replace", "added": 0, "updated": 0, "unchanged": 1, "removed": 1}
    _error(other.get("/concepts/layer3/2/label"), 404, "no_label")
    _error(other.put("/labels?mode=overwrite", json=exported, headers=AUTH), 400, "invalid_request", "'merge'")


def test_json_content_type_with_charset_is_accepted(client):
    body = json.dumps({"label": "x"}).encode()
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert client.put("/concepts/layer2/0/label", content=body, headers=headers).status_code == 200


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"label": "x", "colour": "red"},
            "unknown field 'colour' (the fields are: label, note, expected_version, author)",
        ),
        ({"note": "x"}, "field 'label' is required"),
        ({"label": 3}, "field 'label'"),
        ({"label": "x", "expected_version": "1"}, "field 'expected_version'"),
        ({"label": "x", "expected_version": True}, "field 'expected_version'"),
        ({"label": "x", "note": None}, "field 'note'"),
    ],
)
def test_bad_bodies_name_the_field(client, body, message):
    _error(client.put("/concepts/layer2/0/label", json=body, headers=AUTH), 400, "invalid_request", message)


@pytest.mark.parametrize(
    ("content", "reason", "message"),
    [
        (b"", "empty_body", "empty"),
        (b"{oops", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_json", "must be a JSON object, got list"),
        (b"\xff", "invalid_json", "not valid JSON"),
    ],
)
def test_bad_json_is_refused(client, content, reason, message):
    headers = {**AUTH, "Content-Type": "application/json"}
    _error(client.put("/concepts/layer2/0/label", content=content, headers=headers), 400, reason, message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"label": ""}, "label is empty"),
        ({"label": "x" * 201}, "label has 201 characters; at most 200"),
        ({"label": "a\nb"}, "control character"),
        ({"label": "x", "note": "y" * 2001}, "note has 2001 characters"),
        ({"label": "x", "expected_version": -1}, "expected_version must be a non-negative integer"),
    ],
)
def test_bad_labels_are_refused(client, body, message):
    _error(client.put("/concepts/layer2/0/label", json=body, headers=AUTH), 400, "invalid_label", message)


def test_unknown_layer_and_concept(client):
    _error(client.get("/concepts/layer9/0/label"), 404, "unknown_layer", "concept layers are layer2, layer3")
    _error(
        client.put("/concepts/layer9/0/label", json={"label": "x"}, headers=AUTH),
        404,
        "unknown_layer",
        "layer2, layer3",
    )
    _error(client.get("/concepts/layer2/128/label"), 404, "unknown_concept", "has concepts 0..127")
    _error(client.get("/concepts/layer2/-1/label"), 404, "unknown_concept", "not a valid id")
    _error(client.get("/concepts/layer2/" + "9" * 50 + "/label"), 404, "unknown_concept", "not a valid id")


def test_conflict(client):
    url = "/concepts/layer2/3/label"
    client.put(url, json={"label": "first"}, headers=AUTH)
    client.put(url, json={"label": "second"}, headers=AUTH)
    body = _error(client.put(url, json={"label": "late", "expected_version": 1}, headers=AUTH), 409, "label_conflict")
    assert "at version 2, not the expected version 1" in body["error"]
    _error(client.put(url, json={"label": "new", "expected_version": 0}, headers=AUTH), 409, "label_conflict")


def test_stale_labels(client, store, tmp_path):
    stale_doc = {**store.export(), "model_sha256": OTHER_SHA}
    body = _error(client.put("/labels", json=stale_doc, headers=AUTH), 409, "stale_labels")
    assert OTHER_SHA in body["error"] and SHA in body["error"]

    LabelStore(store.path, OTHER_SHA, LAYERS).put("layer2", 0, "theirs")  # the file now belongs to another model
    _error(client.put("/concepts/layer2/0/label", json={"label": "x"}, headers=AUTH), 409, "stale_labels", OTHER_SHA)
    _error(client.get("/labels"), 409, "stale_labels")
    _error(client.get("/concepts/layer2/0/label"), 404, "no_label", "labels are not served")


def test_import_refusals_name_the_entry(client, store):
    doc = store.export()
    bad = {
        **doc,
        "layers": {"layer2": {"500": {"label": "x", "updated_at": "2025-01-01T00:00:00+00:00", "version": 1}}},
    }
    _error(client.put("/labels", json=bad, headers=AUTH), 400, "invalid_label", "layers.layer2.500")
    _error(client.put("/labels", json={**doc, "layers": {"layerX": {}}}, headers=AUTH), 400, "invalid_label", "layerX")


def test_corrupt_file(client, store):
    store.path.write_text("{broken")
    _error(client.get("/labels"), 500, "labels_corrupt", "not valid JSON")
    _error(client.put("/concepts/layer2/0/label", json={"label": "x"}, headers=AUTH), 500, "labels_corrupt")
    assert store.path.read_text() == "{broken"


def test_too_large(client):
    url = "/concepts/layer2/0/label"
    big = json.dumps({"label": "x", "note": "y" * MAX_BODY}).encode()
    _error(
        client.put(url, content=big, headers={**AUTH, "Content-Type": "application/json"}),
        413,
        "too_large",
        f"limit of {MAX_BODY} bytes",
    )

    def chunks():  # no Content-Length: the streamed bytes are counted
        yield b'{"label": "x", "note": "'
        yield b"y" * MAX_BODY
        yield b'"}'

    response = client.put(url, content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    _error(response, 413, "too_large")
    _error(
        client.put(url, content=b"{}", headers={**AUTH, "Content-Type": "application/json", "Content-Length": "x"}),
        400,
        "bad_content_length",
    )


def test_unsupported_media_type(client):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = client.put(
            "/concepts/layer2/0/label", content=b'{"label": "x"}', headers={**AUTH, "Content-Type": content_type}
        )
        _error(response, 415, "unsupported_media_type", "send application/json")


def test_the_store_getter_may_refuse(tmp_path):
    async def loading() -> LabelStore:
        raise RequestError(503, "loading", "the model is still loading; retry shortly", {"Retry-After": "5"})

    client = TestClient(Starlette(routes=label_routes(loading, TOKEN, MAX_BODY)))
    response = client.get("/labels")
    _error(response, 503, "loading")
    assert response.headers["retry-after"] == "5"
    _error(client.put("/concepts/layer2/0/label", json={"label": "x"}, headers=AUTH), 503, "loading")


def test_unwritable_store(tmp_path):
    store = LabelStore(tmp_path / "missing" / "concept_labels.json", SHA, LAYERS)
    body = _error(
        _client(store).put("/concepts/layer2/0/label", json={"label": "x"}, headers=AUTH), 500, "labels_unwritable"
    )
    assert "the folder does not exist" in body["error"]
