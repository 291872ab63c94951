"""The inference protocols that KServe / Seldon / Triton tooling speaks, mapped onto our own engine calls.

**KServe V1** (the TensorFlow-Serving-style data plane):

* ``GET /v1/models`` → ``{"models": [name]}``; ``GET /v1/models/{name}`` → ``{"name", "ready"}``
  (503 with ``"ready": false`` while the model loads);
* ``POST /v1/models/{name}:predict`` with ``{"instances": [...], "parameters": {"top_k": k}}`` →
  ``{"predictions": [...]}``, each our ``/predict`` record of that image;
* ``POST /v1/models/{name}:explain`` → ``{"explanations": [...]}``, each our ``/explain_batch`` record;
  optional ``parameters``: ``top_k``, ``layers``, ``heatmaps`` (default ``none``), ``heatmap_kind``,
  ``heatmap_size``.

An instance is an image: a base64 string, ``{"b64": "..."}`` or ``{"image_bytes": {"b64": "..."}}`` (the
TF-Serving convention for binary inputs that KServe image models use). An ``:explain`` instance in the
last form may name ``target`` and ``contrast`` next to ``image_bytes`` (TF-Serving's named-inputs row).

**Open Inference Protocol V2** (KServe V2, Triton, Seldon MLServer; ``inference_rest.md`` of
kserve/open-inference-protocol): ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``,
``GET /v2/models/{name}[/versions/{version}]`` (metadata), ``…/ready``, ``POST …/infer``. One input tensor:

* ``image``, ``BYTES`` ``[N]`` (or ``[N, 1]``; ``-1`` as ``N`` means "as many as ``data`` holds", as
  KServe's own examples send): each element an encoded image (JPEG, PNG, …) as base64 text — JSON cannot
  carry raw bytes; MLServer marks such elements with the input parameter ``"content_type": "base64"``,
  which is accepted (and the only ``content_type`` that is);
* ``pixels``, ``FP32`` ``[N, 3, S, S]`` or ``[N, S, S, 3]`` in [0, 1] at the model's input size ``S``
  (RGB / 255, no further normalisation): it skips decoding and resizing and feeds the same engine call.

Outputs (all by default; ``outputs`` selects and orders them): ``logits`` and ``probabilities`` FP32
``[N, C]``, ``predicted_class`` INT64 ``[N]``, ``predicted_label`` BYTES ``[N]`` (class names),
``top_concepts`` INT64 ``[N, k]`` and ``top_contributions`` FP32 ``[N, k]`` (the last concept layer's top
concepts for the predicted class, as ``/predict`` reports them); request parameter ``top_k`` (default 5).
The response echoes the request's ``id``, or gives the request's ``X-Request-ID`` when it had none.

Deviations: no binary tensor data extension (JSON only: 415 for other bodies, 400 for ``binary_data*``
parameters), no V2 ``explain``; every error has our envelope ``{"error", "reason", "status",
"request_id"}``, which is the protocols' error object ``{"error": message}`` with more fields. Bodies go
through the request gate like every API route (bounded, validated, images decoded off the event loop).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.edge import current_request_id
from service.errors import RequestError, error_payload, error_response
from service.gate import RouteSpec, decoded_image, validated_request
from service.schemas import (
    HEATMAP_KIND_DESCRIPTION,
    HEATMAPS_DESCRIPTION,
    ClassRef,
    HeatmapFormat,
    HeatmapKind,
    HeatmapSize,
    ImageBase64,
    LayerNames,
    TopK,
)
from service.settings import SETTINGS

if TYPE_CHECKING:
    import torch

    from service.engine import Engine

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "Backend",
    "InferRequest",
    "KServeExplainRequest",
    "KServePredictRequest",
    "gate_routes",
    "infer_outputs",
    "pixels_tensor",
    "routes",
]

_STRICT = ConfigDict(extra="forbid", strict=True)
_INSTANCE_FORMS = 'a base64 string, {"b64": "..."} or {"image_bytes": {"b64": "..."}}'


# ----------------------------------------------------------------------------- KServe V1 requests
def _as_image_instance(value: Any) -> Any:
    """A V1 instance in any of its three forms → the ``{"image_bytes": {"b64": ...}, ...}`` form."""
    if isinstance(value, str):
        return {"image_bytes": {"b64": value}}
    if isinstance(value, dict) and "b64" in value and "image_bytes" not in value:
        return {"image_bytes": value}
    if isinstance(value, dict):
        return value
    raise PydanticCustomError("instance", f"an instance is an image: {_INSTANCE_FORMS}, got {type(value).__name__}")


class B64(BaseModel):
    """TF-Serving's marker of binary data: ``{"b64": "<base64 text>"}``."""

    model_config = _STRICT
    b64: ImageBase64


class ImageInstance(BaseModel):
    """One ``:predict`` instance (every accepted form is normalised to this one)."""

    model_config = _STRICT
    image_bytes: B64


class ExplainInstance(ImageInstance):
    """One ``:explain`` instance: an image, and optionally its own target and contrast."""

    target: ClassRef | None = Field(None, description="class to explain; default: the predicted class")
    contrast: ClassRef | None = Field(None, description="explain target rather than this class")


class PredictParameters(BaseModel):
    """``parameters`` of ``:predict``."""

    model_config = _STRICT
    top_k: TopK = 5


class ExplainParameters(PredictParameters):
    """``parameters`` of ``:explain`` (those of ``/explain_batch``; heatmaps off by default)."""

    layers: LayerNames | None = None
    heatmaps: HeatmapFormat = Field("none", description=HEATMAPS_DESCRIPTION)
    heatmap_kind: HeatmapKind = Field("bcos", description=HEATMAP_KIND_DESCRIPTION)
    heatmap_size: HeatmapSize = None


class KServePredictRequest(BaseModel):
    """``POST /v1/models/{name}:predict``."""

    model_config = _STRICT
    instances: list[Annotated[ImageInstance, BeforeValidator(_as_image_instance)]] = Field(
        min_length=1, max_length=SETTINGS.predict_max_batch, description=f"images: {_INSTANCE_FORMS}"
    )
    parameters: PredictParameters = PredictParameters()


class KServeExplainRequest(BaseModel):
    """``POST /v1/models/{name}:explain``."""

    model_config = _STRICT
    instances: list[Annotated[ExplainInstance, BeforeValidator(_as_image_instance)]] = Field(
        min_length=1, max_length=SETTINGS.max_batch_items, description=f"images: {_INSTANCE_FORMS}"
    )
    parameters: ExplainParameters = ExplainParameters()


def _instance_texts(payload: dict[str, Any]) -> list[str]:
    """The base64 texts of a validated V1 body's instances, in order (what the gate decodes)."""
    return [_as_image_instance(value)["image_bytes"]["b64"] for value in payload["instances"]]


# ----------------------------------------------------------------------------- OIP V2 requests
Parameter = StrictStr | StrictInt | StrictFloat | StrictBool
"""A ``$parameter`` value of the protocol."""


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of the model's metadata: name, datatype, shape (``-1``: variable; ``"C"``/``"S"``/``"k"``)."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]
    description: str


INPUTS = (
    TensorSpec("image", "BYTES", (-1,), "encoded images (JPEG, PNG, WebP, GIF, BMP, TIFF) as base64 text"),
    TensorSpec("pixels", "FP32", (-1, 3, "S", "S"), "RGB in [0, 1] at the input size; [N, S, S, 3] too"),
)
OUTPUTS = (
    TensorSpec("logits", "FP32", (-1, "C"), "class logits"),
    TensorSpec("probabilities", "FP32", (-1, "C"), "class probabilities (the model's output activation)"),
    TensorSpec("predicted_class", "INT64", (-1,), "index of the predicted class"),
    TensorSpec("predicted_label", "BYTES", (-1,), "name of the predicted class"),
    TensorSpec("top_concepts", "INT64", (-1, "k"), "the last concept layer's top concepts for the prediction"),
    TensorSpec("top_contributions", "FP32", (-1, "k"), "their contributions to the predicted logit − bias"),
)
_INPUT_BY_NAME = {spec.name: spec for spec in INPUTS}
_OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)


class RequestInput(BaseModel):
    """``$request_input``: one input tensor."""

    model_config = _STRICT
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Parameter] | None = None
    data: list[Any]


class RequestOutput(BaseModel):
    """``$request_output``: one output asked for."""

    model_config = _STRICT
    name: StrictStr
    parameters: dict[str, Parameter] | None = None


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message (already formatted: no context is substituted) names the field."""
    return PydanticCustomError("invalid_tensor", message)


def _no_binary(parameters: dict[str, Parameter] | None, where: str, allowed: tuple[str, ...] = ()) -> None:
    """Refuse the binary tensor data extension's parameters (when true) and any parameter not in ``allowed``."""
    for key, value in (parameters or {}).items():
        if key.startswith("binary_data") and value is not False:
            raise _invalid(
                f"{where}.parameters.{key}: the binary tensor data extension is not supported; send the tensor as "
                "JSON data"
            )
        if not key.startswith("binary_data") and key not in allowed:
            known = ", ".join(allowed) or "none"
            raise _invalid(f"{where}.parameters: unknown parameter {key[:64]!r} (accepted: {known})")


class InferRequest(BaseModel):
    """``$inference_request`` of ``POST /v2/models/{name}/infer`` (see the module docstring for the tensors)."""

    model_config = _STRICT
    id: StrictStr | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1, description="one input: image or pixels")
    outputs: list[RequestOutput] | None = Field(None, description=f"outputs to return: {', '.join(_OUTPUT_NAMES)}")

    @property
    def top_k(self) -> int:
        return int((self.parameters or {}).get("top_k", 5))

    @property
    def requested(self) -> tuple[str, ...]:
        """The output names to return, in order."""
        return _OUTPUT_NAMES if not self.outputs else tuple(output.name for output in self.outputs)

    @model_validator(mode="after")
    def _check(self) -> InferRequest:
        _no_binary(self.parameters, "parameters", ("top_k",))
        top_k = (self.parameters or {}).get("top_k", 5)
        if type(top_k) is not int or not 1 <= top_k <= SETTINGS.max_top_k:
            raise _invalid(f"parameters.top_k must be an integer in [1, {SETTINGS.max_top_k}], got {top_k!r}")
        given = self.inputs[0]
        spec = _INPUT_BY_NAME.get(given.name)
        if spec is None:
            raise _invalid(
                f"inputs[0].name: unknown input {given.name[:64]!r}; this model's inputs are 'image' (BYTES: encoded "
                "images, base64) and 'pixels' (FP32 [N, 3, S, S] in [0, 1]); GET /v2/models/<name> lists them"
            )
        if given.datatype != spec.datatype:
            raise _invalid(f"inputs[0].datatype: input {spec.name!r} is {spec.datatype}, got {given.datatype[:32]!r}")
        if spec.name == "image":
            _check_images(given)
        else:
            _check_pixels_shape(given)
        for i, output in enumerate(self.outputs or ()):
            if output.name not in _OUTPUT_NAMES:
                known = ", ".join(_OUTPUT_NAMES)
                raise _invalid(f"outputs[{i}].name: unknown output {output.name[:64]!r} (the outputs are: {known})")
            _no_binary(output.parameters, f"outputs[{i}]")
        names = [output.name for output in self.outputs or ()]
        if len(set(names)) != len(names):
            raise _invalid(f"outputs: an output is asked for more than once: {names}")
        return self


def _check_images(given: RequestInput) -> None:
    """The ``image`` input: shape ``[N]`` or ``[N, 1]`` (N ≥ 1 or -1), N base64 strings."""
    content_type = (given.parameters or {}).get("content_type", "base64")
    if content_type != "base64":
        raise _invalid(
            "inputs[0].parameters.content_type: image elements are base64 text of encoded images "
            f'(content_type "base64"), got {content_type!r}'
        )
    _no_binary({k: v for k, v in (given.parameters or {}).items() if k != "content_type"}, "inputs[0]")
    shape = given.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or not (shape[0] >= 1 or shape[0] == -1):
        raise _invalid(f"inputs[0].shape: the image input has shape [N] or [N, 1] (N images), got {shape}")
    data = _leaves(given.data, None if shape[0] == -1 else shape)
    count = len(data)
    if not 1 <= count <= SETTINGS.predict_max_batch:
        raise _invalid(f"inputs[0].data: send 1 to {SETTINGS.predict_max_batch} images, got {count}")
    for i, element in enumerate(data):
        if not isinstance(element, str) or not element:
            got = "an empty string" if element == "" else type(element).__name__
            raise _invalid(f"inputs[0].data[{i}]: each element is an image as base64 text, got {got}")


def _check_pixels_shape(given: RequestInput) -> None:
    """The ``pixels`` input's shape up to the input size (which only the loaded model knows)."""
    if (given.parameters or {}).get("content_type") is not None:
        raise _invalid("inputs[0].parameters.content_type: the pixels input takes no content_type")
    _no_binary({k: v for k, v in (given.parameters or {}).items() if k != "content_type"}, "inputs[0]")
    shape = given.shape
    if len(shape) != 4 or 3 not in (shape[1], shape[3]) or min(shape) < 1:
        raise _invalid(f"inputs[0].shape: the pixels input has shape [N, 3, S, S] or [N, S, S, 3], got {shape}")
    if shape[0] > SETTINGS.predict_max_batch:
        raise _invalid(f"inputs[0].shape: at most {SETTINGS.predict_max_batch} images per request, got {shape[0]}")


def _leaves(data: list[Any], shape: list[int] | None) -> list[Any]:
    """Tensor ``data`` flattened in row-major order, checked against ``shape`` (None: any length, flat).

    The protocol allows the flat form or the natural nested one; a nesting that matches neither is refused
    (``RequestError``-free: raises the validation error the gate turns into a 400).
    """
    if not data or not isinstance(data[0], list):
        total = len(data) if shape is None else math.prod(shape)
        if len(data) != total or any(isinstance(v, list) for v in data):
            raise _invalid(
                f"inputs[0].data holds {len(data)} elements (or mixes lists in); shape {shape} needs {total}"
            )
        return data
    if shape is None:
        raise _invalid("inputs[0].data: with shape [-1] send the elements as one flat list")
    level: list[Any] = data
    for depth in range(len(shape)):
        if len(level) != math.prod(shape[: depth + 1]):
            raise _invalid(f"inputs[0].data does not match shape {shape} at depth {depth}")
        if depth == len(shape) - 1:
            break
        if not all(isinstance(v, list) for v in level):
            raise _invalid(f"inputs[0].data does not match shape {shape} at depth {depth}")
        level = [v for sub in level for v in sub]
    if any(isinstance(v, list) for v in level):
        raise _invalid(f"inputs[0].data is nested deeper than shape {shape}")
    return level


def _infer_images(payload: dict[str, Any]) -> list[str]:
    """The base64 texts of a validated V2 body's ``image`` input (none for ``pixels``)."""
    given = payload["inputs"][0]
    if given["name"] != "image":
        return []
    return _leaves(given["data"], None if given["shape"][0] == -1 else given["shape"])


def pixels_tensor(given: RequestInput, size: int) -> torch.Tensor:
    """The ``pixels`` input → ``(N, 3, size, size)`` float32 in [0, 1], or a 400 naming the field.

    Runs on the model thread: turning a few hundred thousand JSON numbers into a tensor takes tens of ms.
    """
    import torch

    shape = given.shape
    if shape[1:] not in ([3, size, size], [size, size, 3]):
        raise RequestError(
            400,
            "invalid_request",
            f"inputs[0].shape must be [N, 3, {size}, {size}] or [N, {size}, {size}, 3] (this model's input size "
            f"is {size}; GET /v2/models/{{name}} gives it), got {shape}",
        )
    try:
        values = _leaves(given.data, shape)
    except PydanticCustomError as err:
        raise RequestError(400, "invalid_request", err.message()) from None
    bad = next((v for v in values if type(v) is not float and type(v) is not int), None)
    if bad is not None:
        raise RequestError(
            400, "invalid_request", f"inputs[0].data: FP32 elements are JSON numbers, got {type(bad).__name__}"
        )
    try:
        pixels = torch.tensor(values, dtype=torch.float32).reshape(shape)  # (N, 3, S, S) or (N, S, S, 3)
    except (OverflowError, RuntimeError):  # an integer beyond any float (10**400)
        raise RequestError(400, "invalid_request", "inputs[0].data: pixel values must be in [0, 1]") from None
    if not bool(torch.isfinite(pixels).all()):
        raise RequestError(400, "invalid_request", "inputs[0].data: pixel values must be finite numbers")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0 or high > 1:
        raise RequestError(
            400,
            "invalid_request",
            f"inputs[0].data: pixel values must be in [0, 1] (RGB / 255), got values in [{low:g}, {high:g}]",
        )
    if shape[1:] != [3, size, size]:
        pixels = pixels.permute(0, 3, 1, 2)  # (N, S, S, 3) → (N, 3, S, S)
    return pixels.contiguous()


# ----------------------------------------------------------------------------- responses
def infer_outputs(engine: Engine, tensors: tuple[torch.Tensor, ...], requested: tuple[str, ...]) -> list[dict]:
    """``$response_output`` objects of :meth:`Engine.predict_tensors`'s result, in ``requested`` order."""
    logits, probabilities, ranking, top_ids, top_contributions = engine.compute.to_host(tuple(tensors))  # one copy
    n = logits.shape[0]
    predicted = ranking[:, 0].tolist()
    names = engine.model.class_names
    table = {  # name → (datatype, shape, row-major data); a few numbers per image, so all are built
        "logits": ("FP32", list(logits.shape), logits.float().flatten().tolist()),
        "probabilities": ("FP32", list(probabilities.shape), probabilities.float().flatten().tolist()),
        "predicted_class": ("INT64", [n], predicted),
        "predicted_label": ("BYTES", [n], [names[c] for c in predicted]),
        "top_concepts": ("INT64", list(top_ids.shape), top_ids.long().flatten().tolist()),
        "top_contributions": ("FP32", list(top_contributions.shape), top_contributions.float().flatten().tolist()),
    }
    return [
        {"name": name, "datatype": table[name][0], "shape": table[name][1], "data": table[name][2]}
        for name in requested
    ]


def _tensor_metadata(spec: TensorSpec, engine: Engine) -> dict[str, Any]:
    sizes = {"C": len(engine.model.class_names), "S": engine.input_size, "k": -1}
    return {"name": spec.name, "datatype": spec.datatype, "shape": [sizes.get(d, d) for d in spec.shape]}


def _refusal(err: RequestError, **extra: Any) -> Response:
    """``err`` in the error envelope with protocol fields added (e.g. a probe's ``"ready": false``)."""
    body = json.dumps({**error_payload(err.status, err.reason, err.message), **extra}).encode()
    return Response(body, status_code=err.status, media_type="application/json", headers=err.headers)


def _check_model(engine: Engine, name: str, version: str | None = None) -> None:
    """A 404 naming the served model unless ``name`` (and ``version``, when given) is it."""
    if name != engine.name:
        raise RequestError(
            404,
            "unknown_model",
            f"model {name[:100]!r} is not served here; this server serves {engine.name!r} (GET /v1/models lists it)",
        )
    if version is not None and version != engine.version:
        raise RequestError(
            404,
            "unknown_version",
            f"model {name!r} has no version {version[:100]!r}; the served version is {engine.version!r}",
        )


def _image(text: str) -> Image.Image:
    image = decoded_image(text)
    if image is None:  # every protocol POST route is gated: a wiring bug, not a client error
        raise RuntimeError("the request gate did not decode this request's image")
    return image


def _package_version() -> str:
    from service.openapi import package_version

    return package_version()


# ----------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class Backend:
    """How the protocol routes reach the service (``service.service`` builds it; tests may pass their own).

    Attributes:
        loaded: the engine if the model is loaded, else None (never waits: readiness probes).
        alive: False once loading the model failed.
        engine: the engine, waiting while it loads (or a 503 ``RequestError``).
        run: ``run(route, fn, *args, units=1)`` runs ``fn(*args)`` on the model thread (``route``'s costs).
        explain: ``explain(texts, targets, contrasts, options)``: the ``/explain_batch`` model call on the
            gate-decoded images ``texts`` with ``options`` (``top_k``, ``layers``, ``heatmaps``, …).
        observe: ``observe(endpoint, records)`` records the per-request metrics of results.
        respond: ``respond(payload, endpoint)``: the JSON response (and its size metric).
    """

    loaded: Callable[[], Engine | None]
    alive: Callable[[], bool]
    engine: Callable[[], Awaitable[Engine]]
    run: Callable[..., Awaitable[Any]]
    explain: Callable[[list[str], list[Any], list[Any], dict[str, Any]], Awaitable[list[dict[str, Any]]]]
    observe: Callable[[str, list[dict[str, Any]]], None]
    respond: Callable[[Any, str], Response]

    def not_ready(self, **extra: Any) -> Response:
        """The 503 of a readiness probe while the model loads (or after it failed to)."""
        if not self.alive():
            err = RequestError(503, "load_failed", "not ready: the model failed to load; the server log says why")
        else:
            err = RequestError(
                503, "loading", "not ready: the model is still loading; retry shortly", {"Retry-After": "5"}
            )
        return _refusal(err, **extra)


def routes(backend: Backend) -> list[Route]:
    """The Starlette routes of both protocols (POST bodies must pass :func:`gate_routes`' gate first)."""

    async def v1_models(request: Request) -> Response:
        engine = backend.loaded()
        return backend.respond({"models": [] if engine is None else [engine.name]}, "v1_models")

    async def v1_model(request: Request) -> Response:
        name = request.path_params["name"]
        engine = backend.loaded()
        if engine is None:
            return backend.not_ready(name=name, ready=False)
        try:
            _check_model(engine, name)
        except RequestError as err:
            return error_response(err)
        return backend.respond({"name": name, "ready": True}, "v1_model")

    async def v1_predict(request: Request) -> Response:
        body: KServePredictRequest = validated_request(request.scope)
        try:
            engine = await backend.engine()
            _check_model(engine, request.path_params["name"])
            images = [_image(item.image_bytes.b64) for item in body.instances]
            results = await backend.run("predict", engine.predict, images, body.parameters.top_k)
        except RequestError as err:
            return error_response(err)
        backend.observe("v1_predict", results)
        return backend.respond({"predictions": results}, "v1_predict")

    async def v1_explain(request: Request) -> Response:
        body: KServeExplainRequest = validated_request(request.scope)
        items = body.instances
        try:
            _check_model(await backend.engine(), request.path_params["name"])
            results = await backend.explain(
                [item.image_bytes.b64 for item in items],
                [item.target for item in items],
                [item.contrast for item in items],
                body.parameters.model_dump(),
            )
        except RequestError as err:
            return error_response(err)
        backend.observe("v1_explain", results)
        return backend.respond({"explanations": results}, "v1_explain")

    async def v2_server(request: Request) -> Response:
        return backend.respond({"name": "fact", "version": _package_version(), "extensions": []}, "v2")

    async def v2_live(request: Request) -> Response:
        if not backend.alive():
            return backend.not_ready(live=False)
        return backend.respond({"live": True}, "v2")

    async def v2_ready(request: Request) -> Response:
        if backend.loaded() is None:
            return backend.not_ready(ready=False)
        return backend.respond({"ready": True}, "v2")

    async def v2_model(request: Request) -> Response:
        try:
            engine = await backend.engine()
            _check_model(engine, request.path_params["name"], request.path_params.get("version"))
        except RequestError as err:
            return error_response(err)
        metadata = {
            "name": engine.name,
            "versions": [engine.version],
            "platform": "onnxruntime" if engine.onnx is not None else "pytorch",
            "inputs": [_tensor_metadata(spec, engine) for spec in INPUTS],
            "outputs": [_tensor_metadata(spec, engine) for spec in OUTPUTS],
        }
        return backend.respond(metadata, "v2_model")

    async def v2_model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        engine = backend.loaded()
        if engine is None:
            return backend.not_ready(name=name, ready=False)
        try:
            _check_model(engine, name, request.path_params.get("version"))
        except RequestError as err:
            return error_response(err)
        return backend.respond({"name": name, "ready": True}, "v2_model")

    async def v2_infer(request: Request) -> Response:
        body: InferRequest = validated_request(request.scope)
        given = body.inputs[0]
        try:
            engine = await backend.engine()
            _check_model(engine, request.path_params["name"], request.path_params.get("version"))
            if given.name == "image":
                images = [_image(text) for text in _leaves(given.data, None if given.shape[0] == -1 else given.shape)]
                batch = functools.partial(engine.model.preprocess, images)
            else:
                batch = functools.partial(pixels_tensor, given, engine.input_size)

            def infer() -> list[dict[str, Any]]:
                return infer_outputs(engine, engine.predict_tensors(batch(), body.top_k), body.requested)

            outputs = await backend.run("predict", infer)
        except RequestError as err:
            return error_response(err)
        count = outputs[0]["shape"][0] if outputs else 0
        backend.observe("v2_infer", [{} for _ in range(count)])  # no per-image records: batch size only
        response = {
            "model_name": engine.name,
            "model_version": engine.version,
            "id": body.id if body.id is not None else current_request_id(),
            "outputs": outputs,
        }
        return backend.respond(response, "v2_infer")

    versioned = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{name}:predict", v1_predict, methods=["POST"]),
        Route("/v1/models/{name}:explain", v1_explain, methods=["POST"]),
        Route("/v1/models/{name}", v1_model, methods=["GET"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/v2/health/live", v2_live, methods=["GET"]),
        Route("/v2/health/ready", v2_ready, methods=["GET"]),
        Route("/v2/models/{name}", v2_model, methods=["GET"]),
        Route(versioned, v2_model, methods=["GET"]),
        Route("/v2/models/{name}/ready", v2_model_ready, methods=["GET"]),
        Route(f"{versioned}/ready", v2_model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        Route(f"{versioned}/infer", v2_infer, methods=["POST"]),
    ]


KSERVE_EXPLAIN = re.compile(r"/v1/models/[^/]+:explain")
"""KServe V1's explain route (explanations: admitted by the model-queue budget like ``/explain_batch``)."""


def _explain_work_units(payload: dict[str, Any]) -> int:
    """Model work of a KServe explain body: each image costs one pass plus one per top concept."""
    top_k = (payload.get("parameters") or {}).get("top_k", 5)
    return len(payload.get("instances") or ()) * (1 + (top_k if isinstance(top_k, int) else 5))


def gate_routes() -> dict[re.Pattern[str], RouteSpec]:
    """The request gate's specs of the protocols' POST routes, keyed by path pattern."""
    json_only = ("application/json",)
    return {
        re.compile(r"/v1/models/[^/]+:predict"): RouteSpec(KServePredictRequest, json_only, _instance_texts),
        KSERVE_EXPLAIN: RouteSpec(KServeExplainRequest, json_only, _instance_texts, work_units=_explain_work_units),
        re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer"): RouteSpec(InferRequest, json_only, _infer_images),
    }
