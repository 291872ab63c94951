"""The explanation explorer: a static page at ``/`` (``service/static/``) plus a few embedded-dataset samples.

The page is a plain HTML/CSS/JS client of the JSON API (no build step, nothing fetched from
elsewhere). Sample images are rendered on request from the embedded synthetic dataset the
model's concept statistics were computed on; models of other data get no samples.
BentoML's own Swagger UI, which the page replaces at ``/``, stays reachable at ``/docs``.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.errors import RequestError, error_response, parse_path_id

__all__ = ["STATIC_DIR", "routes"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLES = 10
"""How many samples the page offers (test split indices 0..9: one per class of the synthetic data)."""


def _engine() -> Any:
    import bentoml

    return bentoml.get_current_service().engine


@functools.lru_cache(maxsize=1)
def _sample_config(data_json: str, class_names: tuple[str, ...]) -> tuple[Any, str] | None:
    """The synthetic dataset settings and split to draw samples from, or None for a model of other data."""
    from fact_model.data.synthetic import CLASS_NAMES, SyntheticConfig

    description = json.loads(data_json) if data_json else {}
    if description.get("dataset") == "synthetic":
        return SyntheticConfig.from_description(description), description.get("split", "test")
    if tuple(class_names) == CLASS_NAMES:  # no statistics, but trained on the embedded data
        return SyntheticConfig(), "test"
    return None


def _samples_source() -> tuple[Any, str] | None:
    engine = _engine()
    data = (engine.stats_meta or {}).get("data") or {}
    return _sample_config(json.dumps(data, sort_keys=True), tuple(engine.model.class_names))


@functools.lru_cache(maxsize=SAMPLES)
def _sample_png(config: Any, split: str, index: int) -> tuple[bytes, int]:
    from PIL import Image

    from fact_model.data.synthetic import render_sample

    image, _, label = render_sample(config, split, index)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue(), label


async def _index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


async def _sample_list(request: Request) -> Response:
    source = _samples_source()
    samples = []
    if source is not None:
        config, split = source
        names = _engine().model.class_names
        for index in range(min(SAMPLES, config.split_size(split))):
            _, label = _sample_png(config, split, index)
            samples.append({"index": index, "label": label, "name": names[label], "url": f"/samples/{index}.png"})
    return Response(json.dumps({"samples": samples}), media_type="application/json")


async def _sample_image(request: Request) -> Response:
    try:
        index = parse_path_id(request.path_params["index"], "sample", "unknown_sample")
    except RequestError as err:
        return error_response(err)
    source = _samples_source()
    if source is None:
        return error_response(
            RequestError(404, "no_samples", "this model was not trained on the embedded dataset: no samples to offer")
        )
    count = min(SAMPLES, source[0].split_size(source[1]))
    if not 0 <= index < count:
        return error_response(RequestError(404, "unknown_sample", f"sample {index} is out of range [0, {count - 1}]"))
    data, _ = _sample_png(*source, index)
    return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})


def _swagger_page() -> Path | None:
    try:
        import _bentoml_impl.server as bentoml_server
    except ImportError:
        return None
    page = Path(bentoml_server.__file__).parent / "main-openapi.html"
    return page if page.is_file() else None


async def _docs(request: Request) -> Response:
    page = _swagger_page()
    if page is None:
        return error_response(
            RequestError(404, "no_docs", "this BentoML version has no Swagger UI page; the schema is at /docs.json")
        )
    return FileResponse(page, media_type="text/html; charset=utf-8")


def routes() -> list[Route | Mount]:
    """The explorer's routes, for the service's Starlette app (mounted at ``/``)."""
    return [
        Route("/", _index, methods=["GET"]),
        Route("/docs", _docs, methods=["GET"]),
        Route("/samples", _sample_list, methods=["GET"]),
        Route("/samples/{index}.png", _sample_image, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
