"""Locust users for the FaCT service: a realistic mix, every response checked for content.

Images (reproducible: a seeded RNG per user) are embedded-dataset test images (PNG) and, with
probability ``_PHOTO_SHARE``, natural photographs that ship inside the scikit-image wheel
(``skimage/data``: astronaut, chelsea, coffee, rocket), centre-cropped and resized to the
model's input and sent as JPEG. Photographs have no ground-truth class: their responses are
checked for content (a valid class, completeness, heatmaps) and reported under their own names
(``... [photo]``). Run through ``loadtests/run`` (which starts the server on loopback and bounds the run).

Environment: ``FACT_LOAD_SEED`` (default 0), ``FACT_LOAD_MIX`` (``mixed``, ``predict`` or
``explain``), ``FACT_LOAD_THROUGHPUT`` (tasks per second per user; unset: as fast as the server
answers, 0–50 ms think time), ``FACT_LOAD_WINDOWS`` (a JSON file to write per-window
statistics to, with ``FACT_LOAD_WINDOW_S`` seconds per window).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import random
import time
from pathlib import Path

from locust import HttpUser, between, constant_throughput, events, task
from PIL import Image, ImageOps

from fact_model.artifacts import resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, render_sample

log = logging.getLogger(__name__)

_CONFIG = SyntheticConfig()
_POOL_SIZE = 64
_PHOTO_SHARE = 0.2
_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")  # bundled in the wheel (no download)
_SEED = int(os.environ.get("FACT_LOAD_SEED", "0"))
_MIX = os.environ.get("FACT_LOAD_MIX", "mixed")
_THROUGHPUT = float(os.environ.get("FACT_LOAD_THROUGHPUT", "0"))
_WINDOWS_PATH = os.environ.get("FACT_LOAD_WINDOWS")
_WINDOW_S = float(os.environ.get("FACT_LOAD_WINDOW_S", "60"))
_USER_IDS = itertools.count()

# The served model is the shipped default (loadtests/run imports it): its input size and classes.
_MANIFEST = json.loads((resolve_artifact_path("default") / "manifest.json").read_text())
_INPUT_SIZE = int(_MANIFEST["input_size"])
_CLASSES = list(_MANIFEST["model"]["class_names"])


def _png(index: int) -> str:
    image, _, _ = render_sample(_CONFIG, "test", index)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _photo(name: str) -> str:
    """A photograph from the installed scikit-image package, centre-cropped and resized, as JPEG base64."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed: pip install -e '.[dev]' (its wheel ships the photographs)")
    path = Path(spec.submodule_search_locations[0]) / "data" / name
    if not path.is_file():
        raise RuntimeError(f"{path} is not in the installed scikit-image wheel")
    with Image.open(path) as image:
        square = ImageOps.fit(image.convert("RGB"), (_INPUT_SIZE, _INPUT_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    square.save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


_POOL = [_png(i) for i in range(_POOL_SIZE)]
_PHOTO_POOL = [_photo(name) for name in _PHOTOS]


def _check_prediction(prediction: object) -> str | None:
    """Why ``prediction`` is not a valid class of the served model, or None."""
    if not isinstance(prediction, dict):
        return "no prediction"
    index = prediction.get("index")
    if not isinstance(index, int) or not 0 <= index < len(_CLASSES) or prediction.get("name") != _CLASSES[index]:
        return f"not a valid class: {prediction!r:.200}"
    return None


def _check_explanation(response, result: dict, heatmaps: str = "none") -> bool:
    """Mark ``response`` failed (and return False) unless ``result`` is a complete, exact explanation."""
    problem = _check_prediction(result.get("prediction"))
    residual = result.get("completeness", {}).get("relative_residual")
    concepts = result.get("concepts")
    if problem is None and not isinstance(residual, float | int):
        problem = "no completeness residual"
    elif problem is None and residual > 1e-4:
        problem = f"completeness residual {residual:.2e} > 1e-4"
    elif problem is None and not concepts:
        problem = "no concepts in the explanation"
    elif problem is None and heatmaps != "none" and any(not c.get("heatmap") for c in concepts):
        problem = "missing heatmap"
    if problem:
        response.failure(problem)
    return problem is None


class FactUser(HttpUser):
    """One client: mostly /predict, then /explain with and without heatmaps, batches and cards."""

    wait_time = constant_throughput(_THROUGHPUT) if _THROUGHPUT > 0 else between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random(_SEED * 1000 + next(_USER_IDS))

    def _image(self) -> tuple[str, bool]:
        """A base64 image and whether it is a photograph."""
        if self.rng.random() < _PHOTO_SHARE:
            return self.rng.choice(_PHOTO_POOL), True
        return self.rng.choice(_POOL), False

    @task(5 if _MIX in ("mixed", "predict") else 0)
    def predict(self) -> None:
        image, photo = self._image()
        payload = {"images": [{"image_base64": image}]}
        name = "/predict [photo]" if photo else "/predict"
        with self.client.post("/predict", json=payload, catch_response=True, name=name) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            body = response.json()
            if not isinstance(body, list) or len(body) != 1:
                response.failure("malformed /predict response")
            elif problem := _check_prediction(body[0].get("prediction")):
                response.failure(problem)
            elif len(body[0].get("concepts", [])) != 5:
                response.failure("/predict did not return 5 concepts")

    def _explain(self, heatmaps: str, top_k: int) -> None:
        image, photo = self._image()
        payload = {"image_base64": image, "top_k": top_k, "heatmaps": heatmaps}
        name = f"/explain [{heatmaps}{', photo' if photo else ''}]"
        with self.client.post("/explain", json=payload, catch_response=True, name=name) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            _check_explanation(response, response.json(), heatmaps)

    @task(2 if _MIX in ("mixed", "explain") else 0)
    def explain_png(self) -> None:
        self._explain("png", 5)

    @task(1 if _MIX == "mixed" else 0)
    def explain_plain(self) -> None:
        self._explain("none", 3)

    @task(1 if _MIX == "mixed" else 0)
    def explain_batch(self) -> None:
        items = [{"image_base64": self._image()[0]} for _ in range(3)]
        payload = {"items": items, "top_k": 3, "heatmaps": "none"}
        with self.client.post("/explain_batch", json=payload, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            results = response.json().get("results")
            if not isinstance(results, list) or len(results) != len(items):
                response.failure(f"expected {len(items)} results")
                return
            for result in results:
                if not _check_explanation(response, result):
                    return

    @task(1 if _MIX == "mixed" else 0)
    def concept_card(self) -> None:
        concept = self.rng.randrange(256)
        with self.client.get(f"/concepts/layer3/{concept}", catch_response=True, name="/concepts/layer3/[id]") as r:
            if r.status_code != 200 or r.json().get("id") != concept:
                r.failure(f"bad concept card (status {r.status_code})")


# ---------------------------------------------------------------- per-window statistics (soak)
_started = time.monotonic()
_windows: dict[int, dict] = {}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@events.test_start.add_listener
def _on_test_start(**_kwargs) -> None:
    global _started
    _started = time.monotonic()
    _windows.clear()


@events.request.add_listener
def _on_request(response_time: float, exception: BaseException | None = None, **_kwargs) -> None:
    if not _WINDOWS_PATH:
        return
    window = _windows.setdefault(int((time.monotonic() - _started) // _WINDOW_S), {"times": [], "failures": 0})
    window["times"].append(response_time)
    window["failures"] += exception is not None


@events.test_stop.add_listener
def _on_test_stop(**_kwargs) -> None:
    if not _WINDOWS_PATH:
        return
    rows = []
    for index in sorted(_windows):
        times = _windows[index]["times"]
        span = min(_WINDOW_S, time.monotonic() - _started - index * _WINDOW_S)
        rows.append({
            "window": index,
            "start_s": index * _WINDOW_S,
            "span_s": round(span, 1),  # the last window may be partial
            "requests": len(times),
            "failures": _windows[index]["failures"],
            "requests_per_s": len(times) / span if span > 0 else 0.0,
            "p50_ms": _percentile(times, 0.50),
            "p95_ms": _percentile(times, 0.95),
            "p99_ms": _percentile(times, 0.99),
        })  # fmt: skip
    Path(_WINDOWS_PATH).write_text(json.dumps({"window_s": _WINDOW_S, "windows": rows}, indent=2) + "\n")
    log.info("wrote %d windows of statistics to %s", len(rows), _WINDOWS_PATH)
