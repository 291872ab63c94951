"""The OpenAPI document at ``/docs.json``: BentoML's, completed with what it cannot know.

BentoML documents the ``@bentoml.api`` routes from their schemas. This adds the routes of
the mounted app (``/model``, ``/concepts/…``, ``/samples…``, the KServe V1 and Open Inference
Protocol V2 routes of :mod:`service.protocols`), ``/explain``'s multipart form, response
schemas, the error envelope on every error status each route can answer, and a real
``info.version``. Every route of our own API is also served under ``/v1`` (not listed twice).
"""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

from service.errors import send_error
from service.protocols import INPUTS, OUTPUTS, InferRequest, KServeExplainRequest, KServePredictRequest
from service.schemas import HEATMAP_KIND_DESCRIPTION, HEATMAPS_DESCRIPTION, HeatmapFormat, HeatmapKind

__all__ = ["OpenAPIDocument", "complete_spec", "package_version"]

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "reason", "status"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong, and what to do instead"},
        "reason": {"type": "string", "description": "stable machine-readable token (e.g. bad_top_k, too_large)"},
        "status": {"type": "integer", "description": "the HTTP status, repeated"},
        "request_id": {"type": "string", "description": "the request's id (also the X-Request-ID header)"},
    },
}
_ERROR_TEXT = {
    "400": "invalid request (the message names the field)",
    "404": "no such resource",
    "408": "the body did not arrive in time",
    "413": "request body too large",
    "415": "unsupported Content-Type",
    "429": "too many requests in flight (Retry-After)",
    "500": "unexpected server error (quote the request_id)",
    "503": "overloaded or still loading (Retry-After)",
    "504": "not answered within the deadline",
}
_CLASS = {
    "type": "object",
    "properties": {
        "index": {"type": "integer"},
        "name": {"type": "string"},
        "probability": {"type": "number"},
        "logit": {"type": "number"},
    },
}
_CONCEPT = {
    "type": "object",
    "properties": {
        "layer": {"type": "string"},
        "id": {"type": "integer"},
        "contribution": {"type": "number", "description": "additive contribution to logit − bias (or the contrast)"},
        "share": {"type": "number"},
        "activation": {"type": "number"},
        "heatmap": {"type": ["object", "null"]},
        "children": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "layer": {"type": "string"},
                    "id": {"type": "integer"},
                    "contribution_to_parent": {
                        "type": "number",
                        "description": "contribution to the parent concept's activation (they sum to it)",
                    },
                },
            },
        },
    },
}
EXPLANATION_SCHEMA = {
    "type": "object",
    "properties": {
        "prediction": _CLASS,
        "top_classes": {"type": "array", "items": _CLASS},
        "target": {"type": "object"},
        "contrast": {"type": ["object", "null"]},
        "explained": {"type": "number", "description": "logit − bias of the target (or target − contrast)"},
        "logit_bias": {"type": "number"},
        "layer": {"type": "string"},
        "concepts": {"type": "array", "items": _CONCEPT},
        "other": {"type": "object", "properties": {"contribution": {"type": "number"}}},
        "completeness": {
            "type": "object",
            "properties": {
                "residual": {"type": "number"},
                "relative_residual": {"type": "number"},
                "sum_of_contributions": {"type": "number"},
            },
        },
        "active_concepts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "faithfulness": {"type": "object"},
        "model": {"type": "object"},
        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}
PREDICTION_SCHEMA = {
    "type": "object",
    "properties": {
        "prediction": _CLASS,
        "top_classes": {"type": "array", "items": _CLASS},
        "concepts": {"type": "array", "items": _CONCEPT},
        "logit_bias": {"type": "number"},
        "model": {"type": "object"},
    },
}
_OBJECT = {"type": "object"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: str) -> dict[str, Any]:
    ref = {"$ref": "#/components/schemas/Error"}
    return {s: {"description": _ERROR_TEXT[s], "content": _json_content(ref)} for s in statuses}


def _component(model: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """A pydantic request model (and the models it uses) as components; returns its ``$ref``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _post(summary: str, request: dict[str, Any], response: dict[str, Any], statuses: tuple[str, ...],
          parameters: list) -> dict[str, Any]:  # fmt: skip
    return {
        "post": {
            "summary": summary,
            "tags": ["KServe / Open Inference Protocol"],
            "parameters": parameters,
            "requestBody": {"required": True, "content": _json_content(request)},
            "responses": {"200": {"description": "OK", "content": _json_content(response)}, **_errors(*statuses)},
        }
    }


def _protocol_paths(schemas: dict[str, Any]) -> dict[str, Any]:
    """KServe V1 and OIP V2 (:mod:`service.protocols`): paths, request and response schemas."""
    name = _path_parameter("name", "the served model's name (GET /v1/models)")
    version = _path_parameter("version", "the served model's version (GET /v2/models/{name})")
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {}},
        },
    }
    tensors = "; ".join(f"{t.name} {t.datatype}: {t.description}" for t in (*INPUTS, *OUTPUTS))
    infer_response = {
        "type": "object",
        "description": f"the outputs, row-major ({tensors})",
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string", "description": "the request's id, else its X-Request-ID"},
            "outputs": {"type": "array", "items": tensor},
        },
    }
    metadata = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": tensor},
            "outputs": {"type": "array", "items": tensor},
        },
    }
    ready = {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
    api_errors = ("400", "404", "408", "413", "415", "429", "500", "503", "504")
    infer = _post(
        "OIP V2 inference: one input, image (BYTES, base64) or pixels (FP32 [N, 3, S, S] / [N, S, S, 3] in [0, 1])",
        _component(InferRequest, schemas),
        infer_response,
        api_errors,
        [name],
    )
    paths = {
        "/v1/models": _get("KServe V1: the served models", {"type": "object"}, ("500",)),
        "/v1/models/{name}": _get("KServe V1: model readiness (503 while loading)", ready, ("404", "503"), [name]),
        "/v1/models/{name}:predict": _post(
            "KServe V1 predict: each prediction is the /predict record of that instance",
            _component(KServePredictRequest, schemas),
            {
                "type": "object",
                "properties": {"predictions": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}},
            },
            api_errors,
            [name],
        ),
        "/v1/models/{name}:explain": _post(
            "KServe V1 explain: each explanation is the /explain_batch record of that instance (heatmaps none)",
            _component(KServeExplainRequest, schemas),
            {
                "type": "object",
                "properties": {
                    "explanations": {"type": "array", "items": {"$ref": "#/components/schemas/Explanation"}}
                },
            },
            api_errors,
            [name],
        ),
        "/v2": _get("OIP V2 server metadata", {"type": "object"}, ("500",)),
        "/v2/health/live": _get("OIP V2 liveness (503 once loading failed)", {"type": "object"}, ("503",)),
        "/v2/health/ready": _get("OIP V2 readiness (503 while loading)", {"type": "object"}, ("503",)),
        "/v2/models/{name}": _get("OIP V2 model metadata: input and output tensors", metadata, ("404", "503"), [name]),
        "/v2/models/{name}/versions/{version}": _get(
            "OIP V2 model metadata of a version", metadata, ("404", "503"), [name, version]
        ),
        "/v2/models/{name}/ready": _get("OIP V2 model readiness", ready, ("404", "503"), [name]),
        "/v2/models/{name}/versions/{version}/ready": _get(
            "OIP V2 model readiness of a version", ready, ("404", "503"), [name, version]
        ),
        "/v2/models/{name}/infer": infer,
        "/v2/models/{name}/versions/{version}/infer": {"post": {**infer["post"], "parameters": [name, version]}},
    }
    return paths


def _get(summary: str, schema: dict[str, Any], statuses: tuple[str, ...], parameters: list | None = None,
         media: str = "application/json") -> dict[str, Any]:  # fmt: skip
    content = (
        _json_content(schema)
        if media == "application/json"
        else {media: {"schema": {"type": "string", "format": "binary"}}}
    )
    operation = {
        "summary": summary,
        "tags": ["FaCT"],
        "responses": {"200": {"description": "OK", "content": content}, **_errors(*statuses)},
    }
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _path_parameter(name: str, description: str, integer: bool = False) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 0} if integer else {"type": "string"}
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def complete_spec(base: dict[str, Any], version: str) -> dict[str, Any]:
    """BentoML's OpenAPI document → the complete one (a new dict; ``base`` is not modified)."""
    spec = copy.deepcopy(base)
    info = spec.setdefault("info", {})
    info["version"] = version
    info["description"] = (
        "FaCT: exact concept explanations of an image classifier. Every error has the body "
        "{error, reason, status, request_id}; 429 and 503 carry Retry-After. Every route is also served "
        "under /v1 (/v1/predict is /predict); KServe V1 (/v1/models/…) and the Open Inference Protocol V2 "
        "(/v2/…) are served over the same model calls."
    )
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["Explanation"] = EXPLANATION_SCHEMA
    schemas["Prediction"] = PREDICTION_SCHEMA
    paths = spec.setdefault("paths", {})
    api_errors = ("400", "408", "413", "415", "429", "500", "503", "504")
    explanation = {"$ref": "#/components/schemas/Explanation"}
    responses = {
        "/explain": explanation,
        "/explain_batch": {"type": "object", "properties": {"results": {"type": "array", "items": explanation}}},
        "/predict": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}},
    }
    for route, schema in responses.items():
        operation = paths.get(route, {}).get("post")
        if operation is None:
            continue
        operation["responses"] = {
            "200": {"description": "OK", "content": _json_content(schema)},
            **_errors(*api_errors),
        }
    explain = paths.get("/explain", {}).get("post")
    if explain is not None:
        content = explain.setdefault("requestBody", {}).setdefault("content", {})
        json_schema = content.get("application/json", {}).get("schema", {"$ref": "#/components/schemas/ExplainRequest"})
        content["application/json"] = {"schema": json_schema}
        form = {
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "the image file (curl -F image=@x.png)"},
                "target": {"type": "string", "description": "class index (ASCII digits) or name"},
                "contrast": {"type": "string", "description": "class index (ASCII digits) or name"},
                "top_k": {"type": "integer", "minimum": 1},
                "layers": {
                    "type": "string",
                    "description": "comma-separated concept layer names (or repeat the field)",
                },
                "heatmaps": {
                    "type": "string",
                    "enum": list(get_args(HeatmapFormat)),
                    "description": HEATMAPS_DESCRIPTION,
                },
                "heatmap_kind": {
                    "type": "string",
                    "enum": list(get_args(HeatmapKind)),
                    "description": HEATMAP_KIND_DESCRIPTION,
                },
                "heatmap_size": {
                    "type": "integer",
                    "minimum": 8,
                    "description": "heatmap side in pixels, at most the model's input size (default)",
                },
            },
        }
        content["multipart/form-data"] = {"schema": form}
    layer = _path_parameter("layer", "concept layer name (GET /model lists them)")
    paths["/model"] = _get(
        "The served model: classes, concept layers, preprocessing, accuracy", _OBJECT, ("500", "503")
    )
    paths["/concepts/{layer}"] = _get("Every concept of a layer", _OBJECT, ("404", "500", "503"), [layer])
    paths["/concepts/{layer}/{concept}"] = _get(
        "A concept card: top images with heatmaps, supported classes",
        _OBJECT,
        ("404", "500", "503", "504"),
        [layer, _path_parameter("concept", "concept id", integer=True)],
    )
    paths.update(_protocol_paths(schemas))
    paths["/samples"] = _get("Embedded-dataset sample images offered by the explorer", _OBJECT, ("500",))
    paths["/samples/{index}.png"] = _get(
        "One sample image",
        _OBJECT,
        ("404", "500"),
        [_path_parameter("index", "sample index", integer=True)],
        "image/png",
    )
    return spec


def package_version() -> str:
    """The installed ``fact-model`` version (the document's ``info.version``, OIP V2's server version)."""
    try:
        from importlib.metadata import version

        return version("fact-model")
    except Exception:  # not installed as a package (e.g. a Bento): the source tree's version
        return "0.1.0"


class OpenAPIDocument:
    """ASGI middleware answering ``GET /docs.json`` with :func:`complete_spec` of the service's document.

    Args:
        app: the wrapped ASGI app.
        service: the BentoML service (its ``openapi_spec``).
        settings: the service settings (unused today; the document could show limits).
    """

    def __init__(self, app: Any, service: Any, settings: Any = None) -> None:
        self.app = app
        self.service = service
        self._body: bytes | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/docs.json" or scope.get("method") not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if self._body is None:
            try:
                base = self.service.openapi_spec.asdict()
            except Exception as err:
                from service.errors import RequestError

                await send_error(send, RequestError(500, "internal_error", f"cannot build the OpenAPI document: {err}"))
                return
            self._body = json.dumps(complete_spec(base, package_version())).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self._body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self._body if scope["method"] == "GET" else b""})
