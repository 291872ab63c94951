"""Training on 2 gloo processes (``torchrun --nproc-per-node 2``, loopback) against the single-process run.

What is equal and why:

* **Backbone (DDP)**: every step's global batch, flips, batch-norm statistics and loss scale are the
  single-process ones, so 2 processes follow 1 to float rounding (all-reduce adds gradients in another
  order). Tolerance: 1e-5 absolute on every weight after 2 epochs; measured ≈ 4e-7.
* **Feature collection**: a shard's bytes depend only on the settings and its index, so the shards are
  byte-identical whatever the number of processes, and an interruption on one rank resumes.
* **SAE step**: a step on the ranks' shares of a batch is the single-process step on the whole batch
  (to 1e-6), firing tallies exactly; every rank ends with identical weights.
* **SAE run**: each rank shuffles its own shards, so which vectors meet in a batch differs and the
  weights cannot be equal; the runs reach the same reconstruction quality: final NMSE within 0.03
  absolute of each other (measured difference ≈ 0.01, both far below the 1.0 of a zero reconstruction).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._support import torchrun
from tests._support.distributed_training import CRASH_EXIT

pytestmark = pytest.mark.slow  # each test launches torchrun (2 gloo workers) and a single process

WORKER = "tests._support.distributed_training"


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    (file,) = directory.glob("*.safetensors")
    return load_file(str(file))


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard_*.safetensors"))}


def _worker_on_one_and_two(tmp_path: Path, command: str, record: str) -> tuple:
    """Run the worker's ``command`` alone and on 2 processes; the JSON ``record`` each wrote (rank 0)."""
    for processes in (1, 2):
        torchrun.run(WORKER, [command, "--out", str(tmp_path / f"p{processes}")], processes)
    return tuple(json.loads((tmp_path / f"p{p}" / record).read_text()) for p in (1, 2))


def test_backbone_on_two_processes_follows_one_process(tmp_path):
    command = [
        "-q", "train", "backbone", "--arch", "bcos_resnet8", "--width", "4", "--image-size", "32",
        "--train-size", "48", "--val-size", "16", "--test-size", "16", "--epochs", "2", "--batch-size", "8",
        "--device", "cpu",
    ]  # fmt: skip
    for processes in (1, 2):
        torchrun.run("fact_model.cli", [*command, "--out", str(tmp_path / f"p{processes}")], processes)
    one, two = (_weights(tmp_path / f"p{p}" / "model") for p in (1, 2))
    assert set(one) == set(two)
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=1e-5, msg=key)
    histories = [
        json.loads((tmp_path / f"p{p}" / "model" / "manifest.json").read_text())["provenance"]["history"]
        for p in (1, 2)
    ]
    for a, b in zip(*histories, strict=True):
        assert a["val_acc"] == b["val_acc"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_backbone_interrupted_on_two_processes_resumes_on_one(tmp_path):
    torchrun.run(WORKER, ["backbone", "--out", str(tmp_path / "reference")], 1)
    crashed = torchrun.launch(WORKER, ["backbone", "--out", str(tmp_path / "resumed"), "--crash"], 2)
    assert crashed.returncode != 0  # torchrun reports the dead workers
    assert json.loads((tmp_path / "resumed" / "run" / "checkpoint" / "state.json").read_text())["epoch"] == 1
    assert not (tmp_path / "resumed" / "run" / "model").exists()
    torchrun.run(WORKER, ["backbone", "--out", str(tmp_path / "resumed")], 1)  # another number of processes
    reference, resumed = (_weights(tmp_path / name / "run" / "model") for name in ("reference", "resumed"))
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-5, msg=key)


def test_sae_step_on_two_processes_equals_one_step_on_the_whole_batch(tmp_path):
    one, two = _worker_on_one_and_two(tmp_path, "sae-steps", "steps.json")
    assert two["ranks_identical"]  # both ranks hold the same weights after every step's all-reduce
    assert two["since_fired"] == one["since_fired"] and two["fire_counts"] == one["fire_counts"]  # exact tallies
    assert any(aux > 0 for _, _, aux in one["losses"])  # the auxiliary loss on dead latents took part
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    layer_one, layer_two = (load_file(str(tmp_path / f"p{p}" / "layer.safetensors")) for p in (1, 2))
    for key, value in layer_one.items():
        torch.testing.assert_close(layer_two[key], value, rtol=0, atol=1e-6, msg=key)


def test_sae_run_on_two_processes_reaches_the_single_process_quality(tmp_path):
    one, two = _worker_on_one_and_two(tmp_path, "sae-train", "history.json")
    assert len(one) == len(two) == 12
    first, last = one[0]["nmse"], one[-1]["nmse"]
    assert last < 0.5 * first  # it learnt the planted dictionary
    assert abs(two[-1]["nmse"] - last) < 0.03, (two[-1]["nmse"], last)


def test_collection_interrupted_on_one_rank_resumes_to_the_same_shards(tmp_path):
    torchrun.run(WORKER, ["collect", "--out", str(tmp_path / "reference")], 1)
    reference = _digests(tmp_path / "reference" / "features")
    assert len(reference) == 6

    torchrun.run(WORKER, ["collect", "--out", str(tmp_path / "two")], 2)
    assert _digests(tmp_path / "two" / "features") == reference  # the same files whatever the world size
    manifest = json.loads((tmp_path / "two" / "features" / "done.json").read_text())
    assert manifest == json.loads((tmp_path / "reference" / "features" / "done.json").read_text())

    out = tmp_path / "interrupted" / "features"
    crashed = torchrun.launch(WORKER, ["collect", "--out", str(out.parent), "--crash-rank", "1"], 2)
    assert crashed.returncode != 0 and f"exitcode  : {CRASH_EXIT}" in crashed.stderr + crashed.stdout
    assert not (out / "done.json").exists()
    recorded = sorted(p.name for p in out.glob("shard_*.json"))
    assert "shard_00001.json" in recorded and "shard_00003.json" not in recorded  # rank 1 died after its first
    before = {
        name: (out / name).stat().st_mtime_ns
        for name in _digests(out)
        if name.replace("safetensors", "json") in recorded
    }

    torchrun.run(WORKER, ["collect", "--out", str(out.parent)], 2)
    assert _digests(out) == reference
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before  # intact shards were kept
    assert not list(out.glob(".shard_*.tmp"))


def test_fact_train_concepts_on_two_processes(tmp_path):
    """The CLI end to end: sharded collection (the same shards), data-parallel SAE, rank 0's model."""
    torchrun.run(WORKER, ["backbone", "--out", str(tmp_path / "backbone")], 1)
    command = [
        "-q", "train", "concepts", "--model", str(tmp_path / "backbone" / "run" / "model"), "--layer", "layer3:16:4",
        "--image-size", "32", "--train-size", "512", "--val-size", "16", "--test-size", "16", "--epochs", "4",
        "--batch-size", "64", "--positions", "4", "--shard-mib", "0.005", "--device", "cpu",
    ]  # fmt: skip
    for processes in (1, 2):
        torchrun.run("fact_model.cli", [*command, "--out", str(tmp_path / f"p{processes}")], processes)
    # 4 collection batches of 128 images; 0.005 MiB is one batch a shard, so both ranks collect and train on 2
    features = [tmp_path / f"p{p}" / "features" / "layer3" for p in (1, 2)]
    assert _digests(features[0]) == _digests(features[1]) and len(_digests(features[0])) == 4
    layers = [
        json.loads((tmp_path / f"p{p}" / "model" / "manifest.json").read_text())["provenance"]["layers"][0]
        for p in (1, 2)
    ]
    one, two = (layer["history"] for layer in layers)
    assert [h["epoch"] for h in two] == [1, 2, 3, 4]
    assert layers[0]["norm_factor"] == pytest.approx(layers[1]["norm_factor"], rel=1e-6)  # the same vectors
    assert abs(two[-1]["nmse"] - one[-1]["nmse"]) < 0.05, (two[-1]["nmse"], one[-1]["nmse"])
    assert len(_weights(tmp_path / "p2" / "model")) == len(_weights(tmp_path / "p1" / "model"))
