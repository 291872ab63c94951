"""ONNX export and ONNX Runtime parity with PyTorch (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fact_model
from fact_model.artifacts import ArtifactError, resolve_artifact_path
from fact_model.data.synthetic import SyntheticConfig, SyntheticParts
from fact_model.explanation import rank_classes
from fact_model.onnx_export import ONNX_OUTPUTS, PredictionGraph, export_onnx
from fact_model.onnx_runtime import OnnxPredictor, choose_providers
from tests._support.exactness import ranking_test_model, stable_ranking
from tests.conftest import make_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    default = root / "default"
    shutil.copytree(resolve_artifact_path("default"), default)
    fresh = fact_model.save(make_model([("layer2", 16, 4), ("layer3", 32, 4)], seed=5), root / "fresh")
    return {"default": (default, export_onnx(default)), "fresh": (fresh, export_onnx(fresh, top_k=3))}


def _near_topk_tie(model: fact_model.FaCTModel, images: torch.Tensor, relative_gap: float = 1e-6) -> torch.Tensor:
    """``(N,)``: some position has its k-th and (k+1)-th pre-activations within rounding of each other."""
    from fact_model.bcos.encoding import encode_rgb

    tied = torch.zeros(len(images), dtype=torch.bool)
    with torch.no_grad():
        x6 = encode_rgb(images)
        for info in model.concept_layers:
            layer = model.concept_layer(info.name)
            pre = layer.pre_activations(model.features_at(x6, info.name))  # (N, P, K)
            top = pre.topk(min(info.k + 1, info.num_concepts), dim=-1).values
            gap = (top[..., -2] - top[..., -1]) / top[..., 0].clamp_min(1e-12)
            tied |= ((gap < relative_gap) & (top[..., -2] > 0)).any(dim=1)
    return tied


def _real_images(n: int) -> torch.Tensor:
    images, _, _ = SyntheticParts(SyntheticConfig(test=n), "test").tensors()
    return images.float() / 255


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
@pytest.mark.parametrize("name", ["default", "fresh"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("kind", ["random", "real"])
def test_parity_with_pytorch(exported, name, batch, kind):
    directory, entry = exported[name]
    model = fact_model.load(directory)
    size = model.config.preprocessing.input_size
    if kind == "real" and size == 48:
        images = _real_images(batch)
    else:
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    outputs = OnnxPredictor(directory, device="cpu").run(images)
    with torch.no_grad():
        reference = [t.numpy() for t in PredictionGraph(model, entry["top_k"]).eval()(images)]
    assert tuple(entry["outputs"]) == ONNX_OUTPUTS
    logits, ids, contributions, totals, residual, scores, predicted = (outputs[k] for k in entry["outputs"])
    # Different kernels round differently; where two candidates of a position's TopK are within
    # rounding of each other, either choice is correct and the outputs legitimately differ.
    tied = _near_topk_tie(model, images)
    assert tied.float().mean() <= 0.2, "near-ties should be rare"
    keep = (~tied).numpy()
    scale = np.abs(reference[0]).max() + 1.0
    assert np.abs(logits - reference[0])[keep].max(initial=0) <= 1e-4 * scale
    assert (ids == reference[1])[keep].all()
    assert np.abs(contributions - reference[2])[keep].max(initial=0) <= 1e-4 * (np.abs(reference[2]).max() + 1e-3)
    assert np.abs(totals - reference[3])[keep].max(initial=0) <= 1e-4 * (np.abs(reference[3]).max() + 1e-3)
    assert np.abs(scores - reference[5])[keep].max(initial=0) <= 1e-4 * scale
    assert np.abs(logits - model.logit_bias - scores).max() <= 1e-5 * scale
    assert predicted.dtype == np.int64 and (predicted == outputs["ranking"][:, 0]).all()
    assert (outputs["ranking"] == stable_ranking(torch.from_numpy(scores)).numpy()).all()
    # exported contributions sum to logit − bias: the residual output, against an independent explain()
    explanation = model.explain(images, top_k=entry["top_k"])
    explained = explanation.explained.numpy()
    assert (residual <= 1e-4 * (np.abs(explained) + np.abs(contributions).sum(1) + 1e-6)).all()
    from_explain = explanation.contributions[entry["layer"]].gather(1, torch.from_numpy(ids)).numpy()
    assert np.abs(contributions - from_explain)[keep].max(initial=0) <= 1e-4 * (np.abs(from_explain).max() + 1e-3)


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
def test_manifest_records_the_export(exported):
    directory, entry = exported["default"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["onnx"] == entry and entry["opset"] >= 18
    fact_model.load(directory)  # the extra manifest field does not disturb loading


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
def test_corrupted_or_mismatched_onnx_is_refused(exported, tmp_path):
    source, _ = exported["default"]
    corrupted = tmp_path / "corrupted"
    shutil.copytree(source, corrupted)
    data = bytearray((corrupted / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupted / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        OnnxPredictor(corrupted)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(source, mismatched)
    shutil.copy(exported["fresh"][0] / "model.onnx", mismatched / "model.onnx")
    with pytest.raises(ArtifactError, match="another model"):
        OnnxPredictor(mismatched)
    with pytest.raises(ArtifactError, match="no ONNX export"):
        OnnxPredictor(resolve_artifact_path("default"))


def test_cpu_only_machine_gets_a_quiet_cpu_session():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="cuda"):
        choose_providers("cuda")


def test_model_without_closed_form_is_refused():
    with pytest.raises(ValueError, match="closed-form"):
        PredictionGraph(make_model([("layer2", 16, 4)]), 5)


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
def test_service_serves_predict_through_onnx_runtime(exported, tmp_path):
    import base64
    import io
    import os

    from PIL import Image

    from fact_model.data.synthetic import render_sample
    from tests._support.server import http, post_json, running_server

    directory, _ = exported["default"]
    home = tmp_path / "bentoml"
    home.mkdir()
    env = {"FACT_ARTIFACT": str(directory), "FACT_RUNTIME": "onnx", "FACT_MODEL_TAG": "absent:latest"}
    config = SyntheticConfig()
    with running_server(home, env={**env, "PATH": os.environ.get("PATH", "")}) as url:
        assert http("GET", f"{url}/model")[1]["runtime"]["predict"] == "onnxruntime"
        correct = 0
        for i in range(10):
            image, _, label = render_sample(config, "test", i)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            status, body = post_json(
                f"{url}/predict", {"images": [{"image_base64": base64.b64encode(buffer.getvalue()).decode()}]}
            )
            assert status == 200, body
            correct += body[0]["prediction"]["index"] == label
            assert len(body[0]["concepts"]) == 5
        assert correct >= 9


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
@pytest.mark.parametrize("kind", ["saturated", "tied"])
def test_graph_and_onnx_rank_classes_as_explain_does(kind, tmp_path):
    """Tied logits (saturated) or exactly tied scores: the graph, ONNX Runtime and explain() agree."""
    import onnx

    model, winner = ranking_test_model(kind)
    directory = fact_model.save(model, tmp_path / kind)
    export_onnx(directory, top_k=3)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(123))  # as the images fixture
    explained = model.explain(images, top_k=3)
    with torch.no_grad():
        graph = PredictionGraph(model, 3).eval()(images)
    outputs = OnnxPredictor(directory, device="cpu").run(images)
    expected = explained.ranking
    assert (expected[:, 0] == winner).all()
    assert torch.equal(graph[ONNX_OUTPUTS.index("predicted")], expected[:, 0])
    assert torch.equal(rank_classes(graph[ONNX_OUTPUTS.index("scores")]), expected)
    assert (outputs["predicted"] == expected[:, 0].numpy()).all()
    # ONNX Runtime rounds the lower (unequal) scores its own way: its full ranking is that of
    # its own scores; the decision on top is the same.
    assert (outputs["ranking"] == stable_ranking(torch.from_numpy(outputs["scores"])).numpy()).all()
    top = 2 if kind == "tied" else 1  # the tied pair, lower index first
    assert (outputs["ranking"][:, :top] == expected[:, :top].numpy()).all()
    if kind == "saturated":  # ranking by the logits (not the scores) could not tell these classes apart
        assert (outputs["logits"] == outputs["logits"][:, :1]).all()
    # The exported ArgMax keeps the first of equal maxima (rank_classes' tie rule).
    proto = onnx.load(str(directory / "model.onnx"))
    argmax = [node for node in proto.graph.node if node.op_type == "ArgMax"]
    assert argmax, "the graph picks its predicted class with ArgMax"
    for node in argmax:
        assert all(a.i == 0 for a in node.attribute if a.name == "select_last_index")


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
def test_export_without_the_ranking_outputs_is_refused(exported, tmp_path):
    source, _ = exported["default"]
    old = tmp_path / "old"
    shutil.copytree(source, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["onnx"]["outputs"] = ["logits", "top_ids", "top_contributions", "concept_totals", "residual"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"lacks the outputs \['scores', 'predicted'\].*re-export"):
        OnnxPredictor(old)


@pytest.mark.slow  # an ONNX export (dynamo) per test or fixture
def test_export_never_writes_into_the_installed_package_and_out_copies(tmp_path):
    """The shipped model is refused without --out; with it, a new artifact holds the copy and model.onnx."""
    shipped = resolve_artifact_path("default")
    before = sorted(p.name for p in shipped.iterdir())
    manifest_before = (shipped / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="--out"):
        export_onnx("default")
    out = tmp_path / "with-onnx"
    entry = export_onnx("default", out=out)
    assert sorted(p.name for p in shipped.iterdir()) == before and "model.onnx" not in before
    assert (shipped / "manifest.json").read_bytes() == manifest_before  # the source is untouched
    assert (out / "model.onnx").is_file() and json.loads((out / "manifest.json").read_text())["onnx"] == entry
    assert (out / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    predictor = OnnxPredictor(out)
    images = _real_images(3)
    expected = fact_model.load(shipped)(images).detach().numpy()
    np.testing.assert_allclose(predictor.run(images)["logits"], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not an empty directory"):
        export_onnx("default", out=out)  # an existing artifact is not overwritten
