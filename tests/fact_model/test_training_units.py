"""The pieces of the training loops and the report, each on its own: schedules, losses, bookkeeping, resume."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fact_model.analysis import report as report_module
from fact_model.analysis.c2 import random_concept_consistency
from fact_model.concept_layer import ConceptCodes, ConceptLayer
from fact_model.config import ConceptLayerSpec
from fact_model.training import concepts as concepts_module
from fact_model.training.backbone import BackboneSchedule, BackboneTrainConfig
from fact_model.training.common import BestEpoch, prefixed, set_learning_rate, unprefixed, warmup_cosine
from fact_model.training.concepts import (
    ConceptTrainConfig,
    FiringTracker,
    aux_k_loss,
    sae_learning_rate,
    sae_step,
    train_sae,
)
from fact_model.training.features import FeatureShards

# --- schedules ---------------------------------------------------------------------------------------------


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    total, warmup = 110, 10
    assert [warmup_cosine(s, total, warmup) for s in range(warmup)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warmup_cosine(warmup, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(warmup + 50, total, warmup) == pytest.approx(0.5)  # half-way through the decay: cos(π/2)
    assert warmup_cosine(warmup + 25, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(total, total, warmup) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 7, total, warmup) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    decay = [warmup_cosine(s, total, warmup) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in itertools.pairwise(decay))


def test_sae_learning_rate_scales_the_schedule_by_lr():
    config = ConceptTrainConfig(lr=2e-3, warmup_steps=4)
    assert sae_learning_rate(0, 20, config) == pytest.approx(2e-3 / 4)
    assert sae_learning_rate(4, 20, config) == pytest.approx(2e-3)
    assert sae_learning_rate(12, 20, config) == pytest.approx(1e-3)


def test_backbone_schedule_counts_a_short_last_batch_and_warms_up_at_least_one_step():
    config = BackboneTrainConfig(epochs=3, batch_size=32, lr=1e-2, warmup_epochs=0.5)
    schedule = BackboneSchedule.of(config, 100)
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup) == (4, 12, 2)
    assert schedule.learning_rate(0) == pytest.approx(5e-3)
    assert schedule.learning_rate(1) == pytest.approx(1e-2)
    assert schedule.learning_rate(12) == pytest.approx(0.0, abs=1e-12)
    assert BackboneSchedule.of(BackboneTrainConfig(warmup_epochs=0.0), 10).warmup == 1


def test_set_learning_rate_sets_every_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0}])
    set_learning_rate(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


# --- best epoch and checkpoint namespaces ------------------------------------------------------------------


def test_best_epoch_keeps_a_copy_and_the_earlier_of_ties():
    best = BestEpoch()
    weights = torch.ones(3)
    assert best.offer(0.5, {"w": weights})
    weights.mul_(7)  # the kept state is a copy
    assert torch.equal(best.state["w"], torch.ones(3))
    assert not best.offer(0.5, {"w": torch.zeros(3)})
    assert not best.offer(float("nan"), {"w": torch.zeros(3)})
    assert best.offer(0.75, {"w": torch.full((3,), 2.0)})
    assert best.score == 0.75 and torch.equal(best.state["w"], torch.full((3,), 2.0))


def test_prefixed_namespaces_round_trip_and_do_not_leak():
    tensors = {**prefixed("layer", {"encoder": torch.zeros(1)}), **prefixed("layers", {"x": torch.ones(1)})}
    tensors.update(prefixed("best", None))
    assert sorted(tensors) == ["layer.encoder", "layers.x"]
    assert list(unprefixed("layer", tensors)) == ["encoder"]  # "layers.x" is another namespace
    assert unprefixed("best", tensors) == {}


# --- the concept layer's top-k and the SAE step ------------------------------------------------------------


def test_top_k_gives_the_codes_of_encode():
    torch.manual_seed(0)
    layer = ConceptLayer(6, 40, 5)
    features = torch.randn(2, 6, 3, 4)
    codes = layer.encode(features)
    split = layer.top_k(layer.pre_activations(features), (3, 4), sorted=True)
    assert split.spatial_shape == (3, 4) and split.num_concepts == 40
    torch.testing.assert_close(split.totals(), codes.totals(), rtol=0, atol=1e-6)
    assert (split.values[..., :-1] >= split.values[..., 1:]).all()
    torch.testing.assert_close(layer.decode(split), layer(features), rtol=1e-6, atol=1e-6)
    assert layer.top_k(torch.rand(1, 9, 40)).spatial_shape == (9,)


def _dense_aux_reference(pre, dead, residual, decoder, aux_k):
    """Dense re-computation: per vector, the aux_k largest dead pre-activations as a (B, K) code."""
    masked = torch.where(dead, pre, torch.zeros_like(pre))
    code = torch.zeros_like(pre)
    for b in range(len(pre)):
        order = torch.argsort(masked[b], descending=True)[: min(aux_k, int(dead.sum()))]
        code[b, order] = masked[b, order]
    recon = code @ decoder
    return ((residual - recon) ** 2).sum() / (residual**2).sum()


@pytest.mark.parametrize("aux_k", [3, 50])  # 50 > the 7 dead latents: all of them
def test_aux_k_loss_matches_a_dense_computation_and_only_trains_dead_latents(aux_k):
    torch.manual_seed(1)
    layer = ConceptLayer(5, 20, 2, dtype=torch.float64)
    pre = torch.randn(8, 20, dtype=torch.float64).relu().requires_grad_(True)
    dead = torch.zeros(20, dtype=torch.bool)
    dead[[0, 3, 4, 9, 11, 15, 19]] = True
    residual = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    loss = aux_k_loss(layer, pre, dead, residual, aux_k)
    expected = _dense_aux_reference(pre.detach(), dead, residual.detach(), layer.decoder.detach(), aux_k)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert residual.grad is None  # the residual is a target, not trained through
    assert (pre.grad[:, ~dead] == 0).all() and (pre.grad[:, dead] != 0).any()
    assert (layer.decoder.grad[~dead] == 0).all()


def test_firing_tracker_counts_firings_and_flags_dead_latents():
    tracker = FiringTracker(5, dead_after=3)
    codes = ConceptCodes(
        torch.tensor([[[1.0, 0.0], [2.0, 0.5]]]), torch.tensor([[[0, 1], [0, 2]]]), (2,), num_concepts=5
    )
    dead = tracker.update(codes)  # 2 vectors; latent 1 sits in a slot with value 0: it did not fire
    assert tracker.fire_counts.tolist() == [2, 0, 1, 0, 0]
    assert tracker.since_fired.tolist() == [0, 2, 0, 2, 2]
    assert not dead.any()
    dead = tracker.update(codes)
    assert tracker.since_fired.tolist() == [0, 4, 0, 4, 4]
    assert dead.tolist() == [False, True, False, True, True]
    counts = tracker.epoch_counts(vectors=4, frequent_threshold=0.5)
    assert counts == {"dead_in_epoch": 3, "dead_now": 3, "over_active": 1}  # latent 0: 4 of 4 vectors
    tracker.new_epoch()
    assert tracker.fire_counts.tolist() == [0] * 5 and tracker.since_fired.tolist() == [0, 4, 0, 4, 4]


def test_sae_step_losses_and_constraints():
    torch.manual_seed(2)
    dim, num_concepts, k = 6, 40, 2  # 16 vectors fire at most 32 of the 40 latents
    layer = ConceptLayer(dim, num_concepts, k, dtype=torch.float64)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    batch = torch.randn(16, dim, dtype=torch.float64)
    config = ConceptTrainConfig(aux_k=4, aux_weight=0.5)
    tracker = FiringTracker(num_concepts, dead_after=0)  # every latent not firing in the batch is dead
    with torch.no_grad():
        recon = layer(batch[None])[0]
    before = layer.decoder.detach().clone()
    losses = sae_step(layer, optimizer, batch, tracker, config)
    nmse = float(((batch - recon) ** 2).sum() / (batch**2).sum())
    assert losses.nmse == pytest.approx(nmse, rel=1e-12)
    recon_loss = float(((batch - recon) ** 2).sum(dim=1).mean() / dim)
    assert tracker.dead().any() and losses.aux > 0
    assert losses.loss == pytest.approx(recon_loss + 0.5 * losses.aux, rel=1e-12)
    torch.testing.assert_close(layer.decoder.norm(dim=1), torch.ones(num_concepts, dtype=torch.float64))
    radial = (layer.decoder.grad * before).sum(dim=1)
    torch.testing.assert_close(radial, torch.zeros_like(radial), rtol=0, atol=1e-12)
    assert not torch.equal(layer.decoder.detach(), before)


def test_sae_step_without_dead_latents_has_no_aux_loss():
    torch.manual_seed(3)
    layer = ConceptLayer(4, 6, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
    losses = sae_step(layer, optimizer, torch.randn(8, 4), FiringTracker(6, dead_after=10**6), ConceptTrainConfig())
    assert losses.aux == 0.0


# --- train_sae: schedule wiring, resume --------------------------------------------------------------------


def _shards(directory: Path, count: int = 300, dim: int = 6, shard_size: int = 100) -> FeatureShards:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(4)
    paths = []
    for i in range(0, count, shard_size):
        path = directory / f"shard_{i // shard_size:05d}.safetensors"
        save_file({"features": torch.randn(min(shard_size, count - i), dim, generator=generator) * 3}, str(path))
        paths.append(path)
    return FeatureShards(directory, tuple(paths), count, dim)


def test_train_sae_sets_the_scheduled_learning_rate_before_every_step(tmp_path, monkeypatch):
    shards = _shards(tmp_path / "features")
    config = ConceptTrainConfig(epochs=2, batch_size=64, lr=1e-2, warmup_steps=3)
    seen = []
    real_step = concepts_module.sae_step

    def recording_step(layer, optimizer, batch, firing, config, context):
        seen.append(optimizer.param_groups[0]["lr"])
        return real_step(layer, optimizer, batch, firing, config, context)

    monkeypatch.setattr(concepts_module, "sae_step", recording_step)
    train_sae(shards, ConceptLayerSpec("l", 10, 2), config, lambda state: 0.0, tmp_path / "ckpt", progress=False)
    total = shards.steps(64) * 2
    assert seen == [sae_learning_rate(s, total, config) for s in range(total)]


def test_train_sae_resumed_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    shards = _shards(tmp_path / "features")
    spec = ConceptLayerSpec("l", 16, 2)
    config = ConceptTrainConfig(epochs=3, batch_size=64, lr=1e-2, warmup_steps=2, aux_k=4, dead_after=64)
    scores = iter([0.6, 0.5, 0.4] * 3)
    reference = train_sae(shards, spec, config, lambda state: next(scores), tmp_path / "a", progress=False)

    scores = iter([0.6, 0.5, 0.4] * 3)
    calls = {"n": 0}

    def crash_in_epoch_two(state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return next(scores)

    with pytest.raises(KeyboardInterrupt):
        train_sae(shards, spec, config, crash_in_epoch_two, tmp_path / "b", progress=False)
    resumed = train_sae(shards, spec, config, lambda state: next(scores), tmp_path / "b", progress=False)

    assert resumed.history == reference.history
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.best_val_accuracy == reference.best_val_accuracy == 0.6  # the epoch before the crash
    assert resumed.norm_factor == reference.norm_factor
    for key, value in reference.layer.state_dict().items():
        torch.testing.assert_close(resumed.layer.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="different run"):
        other = ConceptTrainConfig(epochs=3, batch_size=32)
        train_sae(shards, spec, other, lambda state: 0.0, tmp_path / "b", progress=False)


def test_train_sae_keeps_the_best_epoch_with_the_norm_factor_folded_in(tmp_path):
    shards = _shards(tmp_path / "features")
    spec = ConceptLayerSpec("l", 16, 2)
    config = ConceptTrainConfig(epochs=3, batch_size=64, lr=1e-2, warmup_steps=2)
    states = []

    def evaluate(state):
        states.append({k: v.clone() for k, v in state.items()})
        return [0.2, 0.9, 0.1][len(states) - 1]

    result = train_sae(shards, spec, config, evaluate, tmp_path / "ckpt", progress=False)
    assert result.best_val_accuracy == 0.9
    for key, value in states[1].items():
        torch.testing.assert_close(result.layer.state_dict()[key], value, rtol=0, atol=0)
    # the folded decoder's rows have norm 1/s (unit during training)
    norms = result.layer.decoder.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / result.norm_factor))


# --- report sections ---------------------------------------------------------------------------------------


def test_evaluation_section_formats_the_figures_or_says_there_are_none():
    assert "run <code>fact evaluate</code>" in report_module._evaluation_section(None)
    layer = {
        "layer": "layer<3>", "num_concepts": 64, "k": 4, "image_l0_mean": 12.34,
        "concepts_for_80_percent_mean": 5.0, "alive_fraction": 0.875, "reconstruction_nmse": 0.12345,
        "max_relative_residual": 3e-7, "shared_concepts": 9,
    }  # fmt: skip
    text = report_module._evaluation_section(
        {"images": 80, "backbone_accuracy": 0.5, "fact_accuracy": 0.4375, "layers": [layer]}
    )
    assert "backbone 50.00%" in text and "FaCT 43.75%" in text
    for cell in ("layer&lt;3&gt;", "64 / 4", "12.3", "88%", "0.1235", "3.0e-07", "<td>9</td>"):
        assert cell in text, cell


class _FakeEncoder:
    def __init__(self, name: str, scale: float) -> None:
        self.name, self.scale = name, scale

    def encode(self, images, indices):
        generator = torch.Generator().manual_seed(int(indices[0]))
        return torch.randn(len(indices), 3, 4, 4, generator=generator) * self.scale + images.mean()


def test_per_class_random_baseline_is_per_encoder_and_listed_for_every_fact_layer():
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(30) % 3
    reports = [SimpleNamespace(layer=name, source=source) for name in ("l2", "l3") for source in ("fact", "channels")]
    encoders = [_FakeEncoder("a", 1.0), _FakeEncoder("b", 0.1)]
    baseline = report_module._per_class_random(reports, encoders, images, labels, num_classes=3)
    assert sorted(baseline) == [("l2", "a"), ("l2", "b"), ("l3", "a"), ("l3", "b")]
    for encoder in encoders:
        encoded = encoder.encode(images.float() / 255, torch.arange(30))
        encoded = encoded - encoded.mean(dim=(0, 2, 3), keepdim=True)
        per_class = [
            random_concept_consistency(encoded, 10, repeats=5, pool=torch.nonzero(labels == c)[:, 0]) for c in range(3)
        ]
        expected = sum(per_class) / 3
        assert baseline[("l2", encoder.name)] == pytest.approx(expected, rel=1e-6)
        assert baseline[("l3", encoder.name)] == baseline[("l2", encoder.name)]
