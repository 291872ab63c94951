"""The real BentoML server serving a small random-weight B-cos ViT FaCT artifact (``FACT_ARTIFACT``)."""

from __future__ import annotations

import base64
import io
import os

import pytest
import torch
from PIL import Image

import fact_model
from tests._support.server import http, post_json, running_server
from tests.conftest import make_model

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.slow,
]  # a real `bentoml serve` per module

LAYERS = [("transformer.encoder_1", 32, 4), ("transformer.encoder_3", 48, 4)]


def png_base64(width: int, height: int, seed: int) -> str:
    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_service_explains_a_vit_artifact_completely(tmp_path):
    model = make_model(LAYERS, backbone="bcos_vitc")
    directory = fact_model.save(model, tmp_path / "vit")
    home = tmp_path / "bentoml"
    home.mkdir()
    env = {"FACT_ARTIFACT": str(directory), "FACT_MODEL_TAG": "absent:latest", "PATH": os.environ.get("PATH", "")}
    with running_server(home, env=env) as url:
        status, summary = http("GET", f"{url}/model")
        assert status == 200, summary
        assert summary["architecture"] == "bcos_vitc"
        assert [layer["name"] for layer in summary["concept_layers"]] == [name for name, _, _ in LAYERS]

        image = png_base64(48, 40, seed=0)
        status, result = post_json(f"{url}/explain", {"image_base64": image, "top_k": 3})
        assert status == 200, result
        assert result["layer"] == "transformer.encoder_3"
        total = sum(c["contribution"] for c in result["concepts"]) + result["other"]["contribution"]
        assert total == pytest.approx(result["prediction"]["logit"] - result["logit_bias"], rel=1e-4, abs=1e-6)
        assert total == pytest.approx(result["explained"], rel=1e-4, abs=1e-6)
        assert result["completeness"]["relative_residual"] <= 1e-4
        assert len(result["concepts"]) == 3
        assert all(c["children"] and c["children"][0]["layer"] == "transformer.encoder_1" for c in result["concepts"])
        heatmap = Image.open(io.BytesIO(base64.b64decode(result["concepts"][0]["heatmap"]["png_base64"])))
        side = summary["input_size"]  # heatmaps are at the model's input resolution
        assert heatmap.size == (side, side) and heatmap.mode == "RGBA"

        # The same numbers as the library computes on the same preprocessed image.
        pil = Image.open(io.BytesIO(base64.b64decode(image)))
        expl = model.explain(model.preprocess([pil]), top_k=3)
        assert result["explained"] == pytest.approx(float(expl.explained[0]), rel=1e-4, abs=1e-6)
        assert [c["id"] for c in result["concepts"]] == expl.top_ids["transformer.encoder_3"][0].tolist()

        target = result["prediction"]["index"]
        contrast = (target + 1) % len(summary["classes"])
        status, contrasted = post_json(
            f"{url}/explain", {"image_base64": image, "top_k": 3, "contrast": contrast, "heatmaps": "none"}
        )
        assert status == 200, contrasted
        total = sum(c["contribution"] for c in contrasted["concepts"]) + contrasted["other"]["contribution"]
        assert total == pytest.approx(contrasted["explained"], rel=1e-4, abs=1e-6)
        assert contrasted["completeness"]["relative_residual"] <= 1e-4

        status, predicted = post_json(f"{url}/predict", {"images": [{"image_base64": image}]})
        assert status == 200, predicted
        assert predicted[0]["prediction"]["index"] == target
        assert [c["id"] for c in predicted[0]["concepts"][:3]] == [c["id"] for c in result["concepts"]]
