"""Train a B-cos backbone from scratch (``fact train backbone``).

B-cos-v2's recipe, scaled down for a CPU: Adam, linear warm-up then cosine decay,
binary cross-entropy on one-hot targets (with the logit bias ``-log(C-1)`` this
is how B-cos-v2 trains; the model's probabilities are therefore sigmoids),
random horizontal flips. The best epoch by validation accuracy is kept. The run
is resumable: a checkpoint is written atomically after every epoch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.artifacts import save
from fact_model.bcos.encoding import encode_rgb
from fact_model.config import FaCTConfig
from fact_model.data.loading import Batch, TrainingData, shuffled_order
from fact_model.model import FaCTModel
from fact_model.training.checkpoint import load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from fact_model.training.common import (
    BestEpoch,
    accuracy,
    prefixed,
    print_summary,
    set_learning_rate,
    unprefixed,
    warmup_cosine,
)

__all__ = ["BackboneSchedule", "BackboneTrainConfig", "train_backbone"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneTrainConfig:
    """Hyper-parameters of backbone training.

    Attributes:
        arch: registered architecture (``fact_model.backbones.list_backbones()``).
        arch_kwargs: its keyword arguments (``num_classes`` comes from the data).
        epochs, batch_size: passes over the training split; images per step.
        lr, weight_decay: Adam(W) settings. warmup_epochs: linear warm-up length.
        flip: random horizontal flips. seed: everything random derives from it.
    """

    arch: str = "bcos_resnet14"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 0.5
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def _model_config(config: BackboneTrainConfig, data: TrainingData) -> FaCTConfig:
    return FaCTConfig(
        backbone=config.arch,
        backbone_kwargs=dict(config.arch_kwargs),
        class_names=data.class_names,
        preprocessing=data.preprocessing,
        output_activation="sigmoid",
    )


@dataclass(frozen=True)
class BackboneSchedule:
    """Step counts of a run and its learning rate: linear warm-up over ``warmup`` steps, then cosine decay.

    Attributes:
        steps_per_epoch: batches per pass over the training split (the last one may be short).
        total_steps: ``steps_per_epoch · epochs``.
        warmup: warm-up steps (at least 1).
        lr: peak learning rate.
    """

    steps_per_epoch: int
    total_steps: int
    warmup: int
    lr: float

    @classmethod
    def of(cls, config: BackboneTrainConfig, train_items: int) -> BackboneSchedule:
        """The schedule of ``config`` on a training split of ``train_items`` images."""
        steps_per_epoch = -(-train_items // config.batch_size)
        warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
        return cls(steps_per_epoch, steps_per_epoch * config.epochs, warmup, config.lr)

    def learning_rate(self, step: int) -> float:
        """The learning rate at optimisation step ``step`` (0-based)."""
        return self.lr * warmup_cosine(step, self.total_steps, self.warmup)


@dataclass
class _BackboneRun:
    """Everything a backbone checkpoint restores besides the global torch RNG."""

    model: FaCTModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    best: BestEpoch = field(default_factory=BestEpoch)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _checkpoint_meta(config: BackboneTrainConfig) -> dict[str, Any]:
    return {"kind": "backbone", "config": _jsonable(config)}


def _resume(run: _BackboneRun, checkpoint_dir: Path, config: BackboneTrainConfig) -> None:
    """Restore ``run`` and the global torch RNG from ``checkpoint_dir`` (written by :func:`_save_run`)."""
    tensors, meta = load_checkpoint(checkpoint_dir)
    if any(meta.get(key) != value for key, value in _checkpoint_meta(config).items()):
        raise ValueError(
            f"{checkpoint_dir} belongs to a different run (kind/config differ); "
            "use another --out directory or delete it"
        )
    run.model.load_state_dict(unprefixed("model", tensors))
    restore_optimizer(run.optimizer, tensors, meta["optimizer"])
    run.best = BestEpoch(meta["best_acc"], unprefixed("best", tensors) or None)
    run.generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    run.epoch, run.history = meta["epoch"], meta["history"]
    log.info("resuming backbone training from epoch %d (best val acc %.4f)", run.epoch, run.best.score)


def _save_run(run: _BackboneRun, checkpoint_dir: Path, config: BackboneTrainConfig) -> None:
    """Write ``run`` (after epoch ``run.epoch``) and the global torch RNG atomically to ``checkpoint_dir``."""
    opt_tensors, opt_meta = optimizer_tensors(run.optimizer)
    tensors = {**prefixed("model", run.model.state_dict()), **prefixed("best", run.best.state), **opt_tensors}
    tensors["rng.generator"] = run.generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        **_checkpoint_meta(config),
        "epoch": run.epoch,
        "best_acc": run.best.score,
        "history": run.history,
        "optimizer": opt_meta,
    }
    save_checkpoint(checkpoint_dir, tensors, meta)


def _random_flips(images: Tensor, generator: torch.Generator) -> None:
    """Mirror each ``(B, 3, S, S)`` image left–right with probability 1/2, in place."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    images[flip] = images[flip].flip(-1)


def _train_step(run: _BackboneRun, batch: Batch, config: BackboneTrainConfig) -> float:
    """One AdamW step on a batch: binary cross-entropy on one-hot targets; returns the loss."""
    model = run.model
    images = batch.float_images(model.device)
    if config.flip:
        _random_flips(images, run.generator)
    logits = model.forward_encoded(encode_rgb(images)).logits
    targets = F.one_hot(batch.labels.to(logits.device), model.num_classes).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return loss.item()


def _train_epoch(
    run: _BackboneRun,
    data: TrainingData,
    config: BackboneTrainConfig,
    schedule: BackboneSchedule,
    epoch: int,
    progress: bool,
) -> float:
    """One pass over the training split in the seeded order of ``epoch``; returns the mean loss."""
    run.model.train()
    losses = []
    order = shuffled_order(len(data.train), config.seed, epoch)
    pin = run.model.device.type == "cuda"
    reader = data.train.batches(config.batch_size, order=order, pin_memory=pin)
    bar = tqdm(
        reader,
        total=schedule.steps_per_epoch,
        desc=f"backbone epoch {epoch + 1}/{config.epochs}",
        disable=not progress,
        leave=False,
    )
    for i, batch in enumerate(bar):
        if not len(batch):
            continue  # every item of this batch was unreadable
        set_learning_rate(run.optimizer, schedule.learning_rate(epoch * schedule.steps_per_epoch + i))
        losses.append(_train_step(run, batch, config))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return sum(losses) / len(losses)


def _save_model(
    run: _BackboneRun, config: BackboneTrainConfig, data: TrainingData, run_dir: Path, started: float
) -> None:
    """Save the best epoch's model (in eval mode) to ``run_dir/model`` and print the summary."""
    if run.best.state is not None:
        run.model.load_state_dict(run.best.state)
    run.model.eval()
    provenance = {
        "step": "fact train backbone",
        "config": _jsonable(config),
        "data": data.source,
        "history": run.history,
        "best_val_accuracy": run.best.score,
    }
    save(run.model, run_dir / "model", provenance=provenance, overwrite=True)
    print_summary(
        "backbone training",
        {
            "architecture": config.arch,
            "epochs": config.epochs,
            "best val accuracy": run.best.score,
            "final train loss": run.history[-1]["loss"] if run.history else float("nan"),
            "seconds (this session)": round(time.perf_counter() - started, 1),
            "artifact": str(run_dir / "model"),
        },
    )


def train_backbone(
    config: BackboneTrainConfig, data: TrainingData, run_dir: str | Path, progress: bool = True
) -> FaCTModel:
    """Train (or resume training) a backbone; returns the best model, also saved to ``run_dir/model``.

    Args:
        config: hyper-parameters.
        data: train/val splits, streamed (a fresh seeded order every epoch: ``shuffled_order(seed, epoch)``).
        run_dir: where the checkpoint (``checkpoint/``) and the artifact (``model/``) go.
        progress: show progress bars.
    """
    run_dir = Path(run_dir)
    torch.manual_seed(config.seed)
    model = FaCTModel(_model_config(config, data))
    run = _BackboneRun(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
        generator=torch.Generator().manual_seed(config.seed),
    )
    schedule = BackboneSchedule.of(config, len(data.train))
    checkpoint_dir = run_dir / "checkpoint"
    if checkpoint_dir.exists():
        _resume(run, checkpoint_dir, config)

    started = time.perf_counter()
    for epoch in range(run.epoch, config.epochs):
        loss = _train_epoch(run, data, config, schedule, epoch, progress)
        val_acc = accuracy(model, data.val)
        run.history.append({"epoch": epoch + 1, "loss": loss, "val_acc": val_acc})
        log.info("epoch %d: loss %.4f, val acc %.4f", epoch + 1, loss, val_acc)
        run.best.offer(val_acc, model.state_dict())
        run.epoch = epoch + 1
        _save_run(run, checkpoint_dir, config)

    _save_model(run, config, data, run_dir, started)
    return model


def _jsonable(config: BackboneTrainConfig) -> dict[str, Any]:
    return asdict(config)
