"""Tests of fact_model.artifacts: safetensors + manifest save/load, integrity and safety."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

import fact_model
from fact_model.artifacts import (
    ArtifactError,
    load,
    read_manifest,
    resolve_artifact_path,
    save,
    weights_sha256,
)
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.model import FaCTModel


def _model(seed: int = 0) -> FaCTModel:
    torch.manual_seed(seed)
    cfg = FaCTConfig(
        backbone="bcos_resnet8",
        class_names=[f"c{i}" for i in range(5)],
        preprocessing=Preprocessing(32),
        concept_layers=[ConceptLayerSpec("layer3", 32, 4)],
        backbone_kwargs=dict(width=8),
    )
    model = FaCTModel(cfg)
    # Non-default buffers, so a load that ignored them would be caught.
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    return model.eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def _edit_manifest(artifact: Path, **changes: object) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def model() -> FaCTModel:
    return _model()


@pytest.fixture
def artifact(model: FaCTModel, tmp_path: Path) -> Path:
    return save(model, tmp_path / "art", provenance={"dataset": "unit-test"})


# ---------------------------------------------------------------------------- round trip
def test_round_trip_logits_explanations_and_config(model: FaCTModel, artifact: Path) -> None:
    loaded = load(artifact)
    assert not loaded.training
    assert loaded is not model
    assert loaded.config == model.config
    assert loaded.class_names == model.class_names
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    before, after = model.explain(x).contributions, loaded.explain(x).contributions
    assert before.keys() == after.keys() == {"layer3"}
    for name in before:
        assert torch.equal(before[name], after[name])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.manifest == read_manifest(artifact)


def test_manifest_fields_and_sha256(model: FaCTModel, artifact: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    data = (artifact / "model.safetensors").read_bytes()
    assert manifest["weights"] == {
        "file": "model.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    assert weights_sha256(artifact / "model.safetensors") == hashlib.sha256(data).hexdigest()
    assert manifest["format"] == "fact-model"
    assert manifest["format_version"] == 1
    assert manifest["model"] == model.config.to_dict()
    assert manifest["concept_layers"] == [{"name": "layer3", "num_concepts": 32, "k": 4, "in_features": 32}]
    assert manifest["num_classes"] == 5
    assert manifest["logit_bias"] == model.logit_bias
    assert manifest["logit_temperature"] == model.logit_temperature
    assert manifest["B"] == model.backbone.head.b == 2
    assert manifest["input_size"] == 32
    prov = manifest["provenance"]
    assert prov["dataset"] == "unit-test"
    assert prov["fact_model_version"] == fact_model.__version__
    assert prov["torch_version"] == torch.__version__
    assert prov["created_at"].endswith("+00:00")


def test_weights_are_safetensors_not_pickle(artifact: Path) -> None:
    data = (artifact / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert 0 < header_len < len(data) - 8
    assert data[8:9] == b"{"
    header = json.loads(data[8 : 8 + header_len])
    assert "backbone.net.bn1.running_var" in header
    assert not data.startswith(b"PK") and not data.startswith(b"\x80")  # zip / pickle magic


def test_float64_model_round_trips_exactly(tmp_path: Path) -> None:
    model = _model(seed=1).double()
    loaded = load(save(model, tmp_path / "f64"))
    assert loaded.dtype == torch.float64
    x = _images().double()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------- integrity
def test_tampered_weights_are_refused(artifact: Path) -> None:
    weights = artifact / "model.safetensors"
    recorded = json.loads((artifact / "manifest.json").read_text())["weights"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256") as info:
        load(artifact)
    message = str(info.value)
    assert recorded in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert "refusing to load" in message


def test_unknown_architecture(model: FaCTModel, artifact: Path) -> None:
    config = model.config.to_dict()
    config["backbone"] = "resnet9000"
    _edit_manifest(artifact, model=config)
    with pytest.raises(ArtifactError) as info:
        load(artifact)
    assert "resnet9000" in str(info.value)
    assert "bcos_resnet8" in str(info.value)


def test_state_dict_mismatch_names_keys(model: FaCTModel, artifact: Path) -> None:
    # A consistent manifest for a model with a different concept-layer position: the weights do not fit.
    other = FaCTModel(
        FaCTConfig(
            backbone="bcos_resnet8",
            class_names=model.class_names,
            preprocessing=Preprocessing(32),
            concept_layers=[ConceptLayerSpec("layer2", 16, 4)],
            backbone_kwargs=dict(width=8),
        )
    )
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["model"] = other.config.to_dict()
    manifest["concept_layers"] = [{"name": "layer2", "num_concepts": 16, "k": 4, "in_features": 16}]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="missing keys") as info:
        load(artifact)
    assert "concepts.layer2" in str(info.value) and "concepts.layer3" in str(info.value)


def test_edited_summary_is_refused(artifact: Path) -> None:
    _edit_manifest(artifact, num_classes=7)
    with pytest.raises(ArtifactError, match="num_classes"):
        load(artifact)


# ---------------------------------------------------------------------------- overwrite safety
def test_overwrite_protection(model: FaCTModel, artifact: Path) -> None:
    before = _snapshot(artifact)
    other = _model(seed=7)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(other, artifact)
    assert _snapshot(artifact) == before
    x = _images()
    with torch.no_grad():
        assert torch.equal(load(artifact)(x), model(x))
        assert not torch.equal(other(x), model(x))

    assert save(other, artifact, overwrite=True) == artifact
    assert _snapshot(artifact) != before
    with torch.no_grad():
        assert torch.equal(load(artifact)(x), other(x))
    # No temporary or set-aside directories are left next to the artifact.
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]


def test_failed_replace_restores_previous_artifact(
    model: FaCTModel, artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fact_model.artifacts as artifacts

    before = _snapshot(artifact)
    real_rename = artifacts.os.rename

    def flaky_rename(src: object, dst: object) -> None:
        if ".tmp-" in Path(str(src)).name:  # moving the new artifact in fails
            raise OSError("simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(artifacts.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        save(_model(seed=3), artifact, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(artifact) == before
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["art"]
    x = _images()
    with torch.no_grad():
        assert torch.equal(load(artifact)(x), model(x))


def test_save_into_empty_existing_dir_and_missing_parents(model: FaCTModel, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    save(model, empty)
    assert (empty / "model.safetensors").is_file()
    nested = save(model, tmp_path / "a" / "b" / "c")
    assert load(nested).config == model.config


def test_save_onto_a_file_is_refused(model: FaCTModel, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(FileExistsError) as info:
        save(model, target, overwrite=True)
    assert str(info.value) == f"cannot save an artifact to {target}: it exists and is not a directory"
    assert target.read_text() == "keep me"


def test_unserialisable_provenance_touches_nothing(model: FaCTModel, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        save(model, tmp_path / "x", provenance={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- malformed artifacts
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        load(tmp_path / "nope")


def test_missing_manifest(artifact: Path) -> None:
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        load(artifact)


def test_missing_weights(artifact: Path) -> None:
    (artifact / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        load(artifact)


def test_invalid_json(artifact: Path) -> None:
    (artifact / "manifest.json").write_text('{"format": "fact-model",')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(artifact)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"format": "something-else"}, "format"),
        ({"format_version": 2}, "format_version"),
        ({"format_version": "1"}, "format_version"),
        ({"weights": {"file": "../model.safetensors", "sha256": "0" * 64}}, "plain file name"),
        ({"weights": {"file": "model.safetensors", "sha256": "xyz"}}, "sha256"),
    ],
)
def test_bad_manifest_fields(artifact: Path, changes: dict[str, object], pattern: str) -> None:
    _edit_manifest(artifact, **changes)
    with pytest.raises(ArtifactError, match=pattern):
        load(artifact)


@pytest.mark.parametrize("field", ["format", "format_version", "model", "weights"])
def test_missing_required_field(artifact: Path, field: str) -> None:
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest[field]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=field):
        load(artifact)


def test_artifact_error_is_a_value_error() -> None:
    assert issubclass(ArtifactError, ValueError)


# ---------------------------------------------------------------------------- default
def test_default_not_shipped() -> None:
    if (Path(fact_model.__file__).parent / "weights" / "default").exists():
        pytest.skip("this installation ships a default model")
    with pytest.raises(ArtifactError, match="no default model is shipped") as info:
        load("default")
    assert "directory path" in str(info.value)
    with pytest.raises(ArtifactError, match="no default model is shipped"):
        resolve_artifact_path("default")


def test_resolve_plain_paths(tmp_path: Path) -> None:
    assert resolve_artifact_path(tmp_path / "x") == tmp_path / "x"
    assert resolve_artifact_path("some/dir") == Path("some/dir")
    assert resolve_artifact_path(Path("default")) == Path("default")  # a Path is always a path


def test_package_exports_resolve_lazily_and_completely():
    """``import fact_model`` is cheap; every public name resolves to the object of its module."""
    import importlib
    import subprocess
    import sys

    import fact_model

    assert set(fact_model.__all__) - {"__version__"} == set(fact_model._EXPORTS)
    for name, module in fact_model._EXPORTS.items():
        assert getattr(fact_model, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fact_model.nope
    code = "import sys, fact_model; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
