"""Training module: a tiny end-to-end run, resumability, checkpoints, feature sampling, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fact_model.analysis.evaluate import evaluate
from fact_model.artifacts import load
from fact_model.bcos.encoding import encode_rgb
from fact_model.config import ConceptLayerSpec
from fact_model.data.loading import ImageSplit
from fact_model.data.sources import DataSpec, open_split, open_training_data
from fact_model.data.synthetic import CLASS_NAMES
from fact_model.training import backbone as backbone_module
from fact_model.training.backbone import BackboneTrainConfig, train_backbone
from fact_model.training.checkpoint import CheckpointError, load_checkpoint
from fact_model.training.concepts import ConceptTrainConfig, train_concepts
from fact_model.training.features import position_contributions, sample_positions

TINY = DataSpec(image_size=32, train=500, val=100, test=100, seed=3)
TINY_BACKBONE = BackboneTrainConfig(arch="bcos_resnet8", arch_kwargs={"width": 8}, epochs=10, batch_size=32, lr=3e-3)
TINY_CONCEPTS = ConceptTrainConfig(positions_per_image=8, epochs=20, batch_size=128, lr=3e-3, warmup_steps=20)
LAYERS = [ConceptLayerSpec("layer3", 64, 4), ConceptLayerSpec("layer2", 32, 4)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """generate → backbone → concepts, once for the module."""
    run = tmp_path_factory.mktemp("tiny_run")
    data = open_training_data(TINY)
    torch.manual_seed(0)
    backbone = train_backbone(TINY_BACKBONE, data, run / "backbone", progress=False)
    model = train_concepts(load(run / "backbone" / "model"), data, LAYERS, TINY_CONCEPTS, run / "concepts", False)
    return {"run": run, "data": data, "backbone": backbone, "model": model}


def test_end_to_end_learns_and_explains_exactly(tiny_run):
    model = load(tiny_run["run"] / "concepts" / "model")
    report = evaluate(model, open_split(TINY, "test"), progress=False)
    assert report.backbone_accuracy > 0.4, report  # chance is 0.1; 500 training images, a few seconds
    assert report.fact_accuracy > 0.35, report
    assert report.fact_accuracy > report.backbone_accuracy - 0.1, report
    for figures in report.layers:
        assert figures.max_relative_residual <= 1e-4
        assert 0 < figures.alive_fraction <= 1
    manifest = json.loads((tiny_run["run"] / "concepts" / "model" / "manifest.json").read_text())
    for layer in manifest["provenance"]["layers"]:
        nmse = [epoch["nmse"] for epoch in layer["history"]]
        assert nmse[-1] < nmse[0], f"SAE reconstruction error did not fall: {nmse}"
    assert [s["layer"] for s in manifest["model"]["concept_layers"]] == ["layer2", "layer3"]
    assert manifest["provenance"]["data"]["dataset"] == "synthetic"


def test_norm_factor_is_folded_into_the_weights(tiny_run):
    """The saved layer acts on unscaled features: its reconstruction matches the features' scale."""
    model = tiny_run["model"]
    images = tiny_run["data"].val.materialise()[0][:32].float() / 255
    with torch.no_grad():
        features = model.features_at(encode_rgb(images), "layer3")
        recon = model.concept_layer("layer3")(features)
    ratio = recon.norm() / features.norm()
    assert 0.7 < ratio < 1.3


def test_backbone_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch):
    data = open_training_data(DataSpec(image_size=32, train=96, val=32, test=32))
    config = BackboneTrainConfig(arch="bcos_resnet8", arch_kwargs={"width": 4}, epochs=2, batch_size=32)
    reference = train_backbone(config, data, tmp_path / "reference", progress=False)

    calls = {"n": 0}
    real_accuracy = backbone_module.accuracy

    def crash_on_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash during epoch 2")
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(backbone_module, "accuracy", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_backbone(config, data, tmp_path / "interrupted", progress=False)
    _, meta = load_checkpoint(tmp_path / "interrupted" / "checkpoint")
    assert meta["epoch"] == 1
    monkeypatch.setattr(backbone_module, "accuracy", real_accuracy)
    resumed = train_backbone(config, data, tmp_path / "interrupted", progress=False)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert load(tmp_path / "interrupted" / "model").num_classes == 10


def test_corrupt_or_truncated_checkpoint_is_refused(tmp_path):
    data = open_training_data(DataSpec(image_size=32, train=32, val=16, test=16))
    config = BackboneTrainConfig(arch="bcos_resnet8", arch_kwargs={"width": 4}, epochs=1, batch_size=32)
    train_backbone(config, data, tmp_path, progress=False)
    tensors_file = tmp_path / "checkpoint" / "state.safetensors"
    tensors_file.write_bytes(tensors_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train_backbone(config, data, tmp_path, progress=False)
    (tmp_path / "checkpoint" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint")


def test_position_sampling_follows_contribution_weights():
    weights = torch.tensor([[0.0, 1.0, 2.0, 7.0], [5.0, -5.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_positions(weights, 1, generator) for _ in range(20000)], dim=1)
    for row in range(2):
        frequencies = torch.bincount(draws[row], minlength=4).float() / draws.shape[1]
        expected = weights[row].abs() / weights[row].abs().sum()
        # 20000 draws: binomial std ≤ 0.0036, so 0.015 is > 4 sigma.
        torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)
    never = sample_positions(weights, 2, generator)
    assert not (never[0] == 0).any()  # zero-weight positions are never drawn (without replacement)


def test_position_contributions_sum_to_the_predicted_logit(tiny_run):
    model = tiny_run["backbone"]
    x6 = encode_rgb(tiny_run["data"].val.materialise()[0][:8].float() / 255)
    _, contributions = position_contributions(model, x6, "layer2")
    with torch.no_grad():
        scores = model.forward_encoded(x6).scores
    torch.testing.assert_close(contributions.sum(1), scores.max(1).values, rtol=1e-4, atol=1e-6)


def test_unknown_layer_fails_at_once_listing_valid_ones(tiny_run):
    with pytest.raises(ValueError, match=r"'layer9'.*\['conv1', 'bn1', 'layer1', 'layer2', 'layer3'\]"):
        train_concepts(
            tiny_run["backbone"], tiny_run["data"], [ConceptLayerSpec("layer9", 8, 2)], TINY_CONCEPTS, "/nonexistent"
        )


def test_folder_training_skips_corrupt_files(tmp_path, caplog):
    from fact_model.data.export import export_png_folder

    images, labels = open_split(DataSpec(image_size=32, test=40), "test").materialise()
    export_png_folder(images, labels, tuple(CLASS_NAMES), tmp_path / "folder")
    (tmp_path / "folder" / "00_red_disc_+_blue_square" / "broken.png").write_bytes(b"not a png at all")
    data = open_training_data(DataSpec(source=str(tmp_path / "folder"), image_size=32, val_fraction=0.25, workers=1))
    assert len(data.train) + len(data.val) == 41  # listed, not decoded up front
    with caplog.at_level(logging.WARNING):
        read = sum(len(b) for split in (data.train, data.val) for b in split.batches(16))
    assert read == 40  # the broken file is left out, in a worker process
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 unreadable" in warnings[0] and "broken.png" in warnings[0], warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert sum(len(b) for split in (data.train, data.val) for b in split.batches(16)) == 40
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]  # reported once, not every epoch
    assert data.class_names == tuple(CLASS_NAMES)


@pytest.mark.parametrize("layout,message", [({}, "no class"), ({"cats": 2}, "at least 2 classes")])
def test_bad_folders_fail_at_once(tmp_path, layout, message):
    from PIL import Image

    for name, count in layout.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    with pytest.raises(ValueError, match=message):
        open_training_data(DataSpec(source=str(tmp_path), image_size=32))


def test_concept_training_resumes_after_interrupt(tiny_run, tmp_path, monkeypatch):
    from fact_model.training import concepts as concepts_module

    data, backbone = tiny_run["data"], load(tiny_run["run"] / "backbone" / "model")
    spec = [ConceptLayerSpec("layer3", 32, 4)]
    config = ConceptTrainConfig(positions_per_image=4, epochs=3, batch_size=256)
    real_accuracy = concepts_module.accuracy
    calls = {"n": 0}

    def crash_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: backbone accuracy, 2: epoch 1, 3: epoch 2
            raise KeyboardInterrupt("simulated crash")
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(concepts_module, "accuracy", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_concepts(backbone, data, spec, config, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint_layer3")[1]["epoch"] == 1
    monkeypatch.setattr(concepts_module, "accuracy", real_accuracy)
    model = train_concepts(load(tiny_run["run"] / "backbone" / "model"), data, spec, config, tmp_path, progress=False)
    history = json.loads((tmp_path / "model" / "manifest.json").read_text())["provenance"]["layers"][0]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert model.explain(data.val.materialise()[0][:4].float() / 255).residual.max() < 1e-4


def test_concept_statistics_are_consistent_with_explanations(tiny_run, tmp_path):
    from fact_model.analysis.concept_stats import compute_concept_stats, load_concept_stats, save_concept_stats

    model = tiny_run["model"]
    images, labels = open_split(TINY, "test").materialise()
    images, labels = images[:40], labels[:40]
    split = ImageSplit.from_tensors(images, labels, model.class_names)
    stats = compute_concept_stats(model, split, top=5, progress=False)
    save_concept_stats(tmp_path, stats, {"data": "tiny"})
    loaded, meta = load_concept_stats(tmp_path)
    assert meta["data"] == "tiny" and torch.equal(loaded["layer3/top_indices"], stats["layer3/top_indices"])
    top_values = stats["layer3/top_activations"]
    assert top_values.shape == (64, 5) and (top_values[:, :-1] >= top_values[:, 1:]).all()
    concept = int(top_values[:, 0].argmax())
    image = int(stats["layer3/top_indices"][concept, 0])
    for target in (0, 3):
        expl = model.explain(images[image : image + 1].float() / 255, target=target)
        assert expl.activations["layer3"][0, concept] == pytest.approx(float(top_values[concept, 0]), rel=1e-5)
        expected = float(stats["layer3/top_contributions"][concept, 0, target])
        assert expl.contributions["layer3"][0, concept] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert stats["layer2/class_mean_contributions"].shape == (10, 32)
    assert ((stats["layer2/frequency"] >= 0) & (stats["layer2/frequency"] <= 1)).all()
    (tmp_path / "concept_stats.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        load_concept_stats(tmp_path)
