"""Locust users for the FaCT service: a realistic mix, every response checked for content.

Images are embedded-dataset test images chosen with a seeded RNG per user (reproducible).
Run through ``loadtests/run`` (which starts the server on loopback and bounds the run).
Environment: ``FACT_LOAD_SEED`` (default 0), ``FACT_LOAD_MIX`` (``mixed``, ``predict`` or ``explain``).
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import random

from locust import HttpUser, between, task
from PIL import Image

from fact_model.data.synthetic import SyntheticConfig, render_sample

_CONFIG = SyntheticConfig()
_POOL_SIZE = 64
_SEED = int(os.environ.get("FACT_LOAD_SEED", "0"))
_MIX = os.environ.get("FACT_LOAD_MIX", "mixed")
_USER_IDS = itertools.count()


def _png(index: int) -> tuple[str, int]:
    image, _, label = render_sample(_CONFIG, "test", index)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode(), label


_POOL = [_png(i) for i in range(_POOL_SIZE)]


def _check_explanation(response, result: dict) -> None:
    if "prediction" not in result or "name" not in result["prediction"]:
        response.failure("no prediction in the explanation")
    elif result["completeness"]["relative_residual"] > 1e-4:
        response.failure(f"completeness residual {result['completeness']['relative_residual']:.2e} > 1e-4")


class FactUser(HttpUser):
    """One client: mostly /predict, then /explain with and without heatmaps, batches and cards."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.rng = random.Random(_SEED * 1000 + next(_USER_IDS))

    def _image(self) -> tuple[str, int]:
        return self.rng.choice(_POOL)

    @task(5 if _MIX in ("mixed", "predict") else 0)
    def predict(self) -> None:
        image, _ = self._image()
        with self.client.post("/predict", json={"images": [{"image_base64": image}]}, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            body = response.json()
            if not body or "prediction" not in body[0] or len(body[0]["concepts"]) != 5:
                response.failure("malformed /predict response")

    def _explain(self, heatmaps: str, top_k: int) -> None:
        image, _ = self._image()
        payload = {"image_base64": image, "top_k": top_k, "heatmaps": heatmaps}
        with self.client.post("/explain", json=payload, catch_response=True, name=f"/explain [{heatmaps}]") as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            result = response.json()
            _check_explanation(response, result)
            if heatmaps != "none" and any(c["heatmap"] is None for c in result.get("concepts", [])):
                response.failure("missing heatmap")

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
            for result in response.json().get("results", []):
                _check_explanation(response, result)

    @task(1 if _MIX == "mixed" else 0)
    def concept_card(self) -> None:
        concept = self.rng.randrange(256)
        with self.client.get(f"/concepts/layer3/{concept}", catch_response=True, name="/concepts/layer3/[id]") as r:
            if r.status_code != 200 or r.json().get("id") != concept:
                r.failure(f"bad concept card (status {r.status_code})")
