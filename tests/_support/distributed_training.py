"""Training workers for the multi-process tests: run alone or under ``torchrun``; rank 0 writes what a test compares.

``python -m tests._support.distributed_training COMMAND --out DIR [...]``:

* ``sae-steps``: four SAE steps on fixed batches, each rank stepping on its share of every batch
  (one batch has a single vector, so one rank's share is empty); writes the layer, the step
  losses and the firing tallies, and checks that every rank ends with the same weights.
* ``sae-train``: a whole SAE run (:func:`train_sae`) on shards of vectors built from a planted
  sparse dictionary; writes the history.
* ``collect``: feature collection at ``layer2`` of a small random FaCT model; ``--crash-rank R``
  makes rank ``R`` die after writing its first shard (an interruption on one rank).
* ``backbone``: :func:`train_backbone` on a small synthetic split; ``--crash`` dies when epoch 2's
  validation starts (the checkpoint of epoch 1 is on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fact_model import distributed
from fact_model.concept_layer import ConceptLayer
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.data.sources import DataSpec, open_split, open_training_data
from fact_model.data.synthetic import CLASS_NAMES
from fact_model.model import FaCTModel
from fact_model.options import torchrun_environment
from fact_model.training import backbone as backbone_module
from fact_model.training import features as features_module
from fact_model.training.backbone import BackboneTrainConfig, train_backbone
from fact_model.training.concepts import ConceptTrainConfig, FiringTracker, sae_step, train_sae
from fact_model.training.features import FeatureShards, collect_features

CRASH_EXIT = 17
"""Exit status of a worker that was told to crash."""


def _sae_steps(out: Path, ctx: distributed.DistributedContext) -> None:
    torch.manual_seed(0)
    layer = ConceptLayer(8, 64, 2)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    firing = FiringTracker(64, dead_after=10)  # 64 latents, ≤ 80 firings a batch: some die, the aux loss takes part
    config = ConceptTrainConfig(aux_k=4)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for size in (37, 40, 1, 29):
        batch = torch.randn(size, 8, generator=generator) * 2
        mine = batch[ctx.shard(size)]  # round-robin rows: uneven shares, an empty one for the single vector
        step = sae_step(layer, optimizer, mine, firing, config, ctx)
        losses.append([step.loss, step.nmse, step.aux])
    states = ctx.all_gather_object({k: v.detach().clone() for k, v in layer.state_dict().items()})
    same = all(torch.equal(s[k], states[0][k]) for s in states for k in states[0])
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(out / "layer.safetensors"))
        record = {
            "losses": losses,
            "since_fired": firing.since_fired.tolist(),
            "fire_counts": firing.fire_counts.tolist(),
            "ranks_identical": same,
        }
        (out / "steps.json").write_text(json.dumps(record))


def _planted_shards(directory: Path) -> FeatureShards:
    """4 shards × 256 vectors in 16 dimensions, each a positive mix of 3 of 24 planted unit directions."""
    generator = torch.Generator().manual_seed(7)
    atoms = torch.nn.functional.normalize(torch.randn(24, 16, generator=generator), dim=1)
    directory.mkdir(parents=True, exist_ok=True)
    paths, sizes = [], []
    for index in range(4):
        picks = torch.rand(256, 24, generator=generator).argsort(dim=1)[:, :3]
        weights = torch.rand(256, 3, generator=generator) + 0.5
        vectors = (weights[..., None] * atoms[picks]).sum(dim=1)
        path = directory / f"shard_{index:05d}.safetensors"
        save_file({"features": vectors.contiguous()}, str(path))
        paths.append(path)
        sizes.append(256)
    return FeatureShards(directory, tuple(paths), sum(sizes), 16, tuple(sizes))


def _sae_train(out: Path, ctx: distributed.DistributedContext) -> None:
    shards = _planted_shards(out / f"shards_rank{ctx.rank}")  # the same bytes on every rank
    config = ConceptTrainConfig(epochs=12, batch_size=128, lr=2e-2, warmup_steps=5, aux_k=8)
    result = train_sae(
        shards, ConceptLayerSpec("planted", 24, 3), config, lambda state: 0.0, out / "checkpoint", False, ctx
    )
    if ctx.is_main:
        (out / "history.json").write_text(json.dumps(result.history))


def _tiny_model() -> FaCTModel:
    torch.manual_seed(0)
    config = FaCTConfig(
        backbone="bcos_resnet8", backbone_kwargs={"width": 4}, class_names=CLASS_NAMES, preprocessing=Preprocessing(32)
    )
    return FaCTModel(config).eval()


def _collect(out: Path, ctx: distributed.DistributedContext, crash_rank: int | None) -> None:
    if crash_rank == ctx.rank:
        real = features_module._write_shard

        def write_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(CRASH_EXIT)  # dies like a killed process: no clean-up, no barrier

        features_module._write_shard = write_then_die
    split = open_split(DataSpec(image_size=32, train=8, val=8, test=22), "test")
    collect_features(
        _tiny_model(),
        split,
        "layer2",
        out / "features",
        positions_per_image=3,
        batch_size=4,
        shard_rows=12,
        progress=False,
        context=ctx,
    )  # fmt: skip  (12 rows = one batch of 4 images per shard: 6 shards, the last one of 2 images)


def _backbone(out: Path, ctx: distributed.DistributedContext, crash: bool) -> None:
    if crash:
        real, calls = backbone_module.accuracy, {"n": 0}

        def die_in_epoch_two(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                os._exit(CRASH_EXIT)
            return real(*args, **kwargs)

        backbone_module.accuracy = die_in_epoch_two
    data = open_training_data(DataSpec(image_size=32, train=48, val=16, test=16))
    config = BackboneTrainConfig(
        arch="bcos_resnet8", arch_kwargs={"width": 4}, epochs=3, batch_size=8, lr=3e-3, clip_grad_norm=5.0
    )
    train_backbone(config, data, out / "run", progress=False, context=ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distributed_training")
    parser.add_argument("command", choices=["sae-steps", "sae-train", "collect", "backbone"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crash-rank", type=int, default=None)
    parser.add_argument("--crash", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with distributed.session(torchrun_environment(), device="cpu") as ctx:
        if args.command == "sae-steps":
            _sae_steps(args.out, ctx)
        elif args.command == "sae-train":
            _sae_train(args.out, ctx)
        elif args.command == "collect":
            _collect(args.out, ctx, args.crash_rank)
        else:
            _backbone(args.out, ctx, args.crash)
    return 0


if __name__ == "__main__":
    sys.exit(main())
