"""Train a B-cos backbone from scratch (``fact train backbone``).

B-cos-v2's recipe, scaled down for a CPU: Adam, linear warm-up then cosine decay,
binary cross-entropy on one-hot targets (with the logit bias ``-log(C-1)`` this
is how B-cos-v2 trains; the model's probabilities are therefore sigmoids),
random horizontal flips, optional gradient-norm clipping and (on CUDA) bf16 autocast.
The best epoch by validation accuracy is kept. The run is resumable: a checkpoint is
written atomically after every epoch.

Under ``torchrun`` the same function trains data-parallel with
:class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` stays the *global*
batch: every epoch a seeded :class:`~torch.utils.data.DistributedSampler` deals rank ``r``
the items ``r, r+W, …`` of one permutation, so the ranks' ``B/W``-image batches of step
``i`` together are exactly the single-process batch ``i``; batch norms take their
statistics over all ranks (:func:`~fact_model.bcos.norms.synchronised_batch_norms`); each
rank's loss is scaled by its share of the global batch, so the averaged gradient is the
single-process gradient; the flips of a step are drawn for the whole global batch on every
rank. Two processes therefore follow one process to float rounding (when ``W`` divides the
number of training images; otherwise the sampler pads the last batch with repeated images).
Only rank 0 writes checkpoints and the model, logs and shows progress; a run resumes on any
number of processes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from fact_model.artifacts import save
from fact_model.bcos.encoding import encode_rgb
from fact_model.bcos.norms import synchronised_batch_norms
from fact_model.config import FaCTConfig
from fact_model.data.loading import Batch, TrainingData
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
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
        epochs, batch_size: passes over the training split; images per step (the global batch:
            under ``torchrun`` it is split evenly over the processes).
        lr, weight_decay: Adam(W) settings. warmup_epochs: linear warm-up length.
        flip: random horizontal flips. seed: everything random derives from it.
        clip_grad_norm: clip the gradient's global L2 norm to this value (``None``: no clipping).
        amp: bf16 autocast of the forward pass (CUDA only; the loss and the optimiser stay float32).
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
    clip_grad_norm: float | None = None
    amp: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 (or None), got {self.clip_grad_norm!r}")


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
    def of(cls, config: BackboneTrainConfig, train_items: int, world_size: int = 1) -> BackboneSchedule:
        """The schedule of ``config`` on a training split of ``train_items`` images, read by ``world_size`` ranks.

        Each rank reads ``⌈n / W⌉`` items (the sampler pads) in batches of ``B / W``.
        """
        per_rank, local_batch = -(-train_items // world_size), config.batch_size // world_size
        steps_per_epoch = -(-per_rank // local_batch)
        warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
        return cls(steps_per_epoch, steps_per_epoch * config.epochs, warmup, config.lr)

    def learning_rate(self, step: int) -> float:
        """The learning rate at optimisation step ``step`` (0-based)."""
        return self.lr * warmup_cosine(step, self.total_steps, self.warmup)


class _Logits(nn.Module):
    """``x6 ↦ model.forward_encoded(x6).logits`` as a module's ``forward``, the call DDP wraps."""

    def __init__(self, model: FaCTModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x6: Tensor) -> Tensor:
        return self.model.forward_encoded(x6).logits


@dataclass
class _BackboneRun:
    """Everything a backbone checkpoint restores besides the global torch RNG, and the rank's place in the run."""

    model: FaCTModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    network: nn.Module
    context: DistributedContext = SINGLE_PROCESS
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


def _flip_mask(generator: torch.Generator, requested: list[int], batch: Batch, context: DistributedContext) -> Tensor:
    """``(len(batch),)`` bool: which of this rank's images to mirror, drawn for the whole global batch.

    Every rank draws ``W · len(requested)`` numbers (the global step's images; the generators stay
    in step) and takes positions ``rank, rank + W, …`` — the places its images hold in the
    single-process batch — then keeps the readable ones.
    """
    draws = torch.rand(context.world_size * len(requested), generator=generator)[context.rank :: context.world_size]
    skipped = {position for position, _ in batch.skipped}
    readable = torch.tensor([position not in skipped for position in requested], dtype=torch.bool)
    return (draws < 0.5)[readable]


def _train_step(run: _BackboneRun, batch: Batch, flips: Tensor | None, config: BackboneTrainConfig) -> float:
    """One AdamW step on this rank's part of a global batch; returns the rank's summed loss.

    The loss is binary cross-entropy on one-hot targets, averaged over the *global* batch: each
    rank's sum is divided by the global element count and multiplied by ``W``, which DDP's
    gradient averaging divides out again.
    """
    model, context = run.model, run.context
    images = batch.float_images(model.device)
    if flips is not None and flips.any():
        flips = flips.to(images.device)
        images[flips] = images[flips].flip(-1)
    global_images = int(context.all_reduce_sum(torch.tensor([len(batch)], dtype=torch.long))[0])
    if global_images == 0:
        return 0.0  # no rank could read an image of this step: every rank skips it alike
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=config.amp):
        logits = run.network(encode_rgb(images))
    targets = F.one_hot(batch.labels.to(logits.device), model.num_classes).float()
    loss_sum = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum")
    loss = loss_sum * (context.world_size / (global_images * model.num_classes))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.clip_grad_norm is not None:  # the gradients are already averaged: every rank clips alike
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
    run.optimizer.step()
    return loss_sum.item()


def _train_epoch(
    run: _BackboneRun,
    data: TrainingData,
    config: BackboneTrainConfig,
    schedule: BackboneSchedule,
    epoch: int,
    progress: bool,
) -> float:
    """One pass over the training split in the seeded order of ``epoch``; returns the mean loss per element.

    Every rank takes every step, even one whose images all failed to read, so the collectives match.
    """
    context = run.context
    run.model.train()
    sampler = DistributedSampler(
        range(len(data.train)), num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    local_batch = config.batch_size // context.world_size
    pin = run.model.device.type == "cuda"
    reader = data.train.batches(local_batch, order=order, pin_memory=pin)
    bar = tqdm(
        reader,
        total=schedule.steps_per_epoch,
        desc=f"backbone epoch {epoch + 1}/{config.epochs}",
        disable=not (progress and context.is_main),
        leave=False,
    )
    loss_sum, images = 0.0, 0
    for i, batch in enumerate(bar):
        requested = order[i * local_batch : (i + 1) * local_batch]
        flips = _flip_mask(run.generator, requested, batch, context) if config.flip else None
        set_learning_rate(run.optimizer, schedule.learning_rate(epoch * schedule.steps_per_epoch + i))
        loss_sum += _train_step(run, batch, flips, config)
        images += len(batch)
        bar.set_postfix(loss=f"{loss_sum / max(1, images * run.model.num_classes):.4f}")
    totals = context.all_reduce_sum(torch.tensor([loss_sum, float(images)], dtype=torch.float64))
    if totals[1] == 0:
        raise ValueError(f"no readable training image in {data.train!r}")
    return float(totals[0] / (totals[1] * run.model.num_classes))


def _save_model(
    run: _BackboneRun, config: BackboneTrainConfig, data: TrainingData, run_dir: Path, started: float
) -> None:
    """Save the model (the best epoch's, in eval mode) to ``run_dir/model`` and print the summary."""
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


def _network(model: FaCTModel, context: DistributedContext) -> nn.Module:
    """What a training step calls: the logits module, wrapped in DDP when several processes train."""
    logits = _Logits(model)
    if not context.is_distributed:
        return logits
    device_ids = [model.device.index] if model.device.type == "cuda" else None
    return DistributedDataParallel(logits, device_ids=device_ids)


def train_backbone(
    config: BackboneTrainConfig,
    data: TrainingData,
    run_dir: str | Path,
    progress: bool = True,
    context: DistributedContext = SINGLE_PROCESS,
    device: str | torch.device | None = None,
) -> FaCTModel:
    """Train (or resume training) a backbone; returns the best model, also saved to ``run_dir/model``.

    Args:
        config: hyper-parameters (``batch_size`` is the global batch).
        data: train/val splits, streamed (a fresh seeded order every epoch).
        run_dir: where the checkpoint (``checkpoint/``) and the artifact (``model/``) go; under
            ``torchrun`` a directory every rank sees (rank 0 writes, every rank reads on resume).
        progress: show progress bars (rank 0 only).
        context: this process's place in a ``torchrun`` launch (see the module docstring).
        device: where a single process trains (default the CPU); under ``torchrun`` the rank's device.

    Raises:
        ValueError: ``batch_size`` not a multiple of the number of processes, or ``amp`` off CUDA.
    """
    run_dir = Path(run_dir)
    if config.batch_size % context.world_size:
        raise ValueError(
            f"--batch-size {config.batch_size} is the global batch and must be a multiple of the "
            f"{context.world_size} processes"
        )
    device = torch.device(context.device if context.is_distributed else (device or "cpu"))
    if config.amp and device.type != "cuda":
        raise ValueError(f"--amp (bf16 autocast) needs a CUDA device; this run trains on {device}")
    torch.manual_seed(config.seed)
    model = FaCTModel(_model_config(config, data)).to(device)
    run = _BackboneRun(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay),
        generator=torch.Generator().manual_seed(config.seed),
        network=_network(model, context),  # resuming below loads every rank's weights in place, alike
        context=context,
    )
    schedule = BackboneSchedule.of(config, len(data.train), context.world_size)
    checkpoint_dir = run_dir / "checkpoint"
    if checkpoint_dir.exists():
        _resume(run, checkpoint_dir, config)

    started = time.perf_counter()
    with synchronised_batch_norms(model, enabled=context.is_distributed):
        for epoch in range(run.epoch, config.epochs):
            loss = _train_epoch(run, data, config, schedule, epoch, progress)
            val_acc = accuracy(model, data.val, context=context)  # sharded; every rank gets the same figure
            run.history.append({"epoch": epoch + 1, "loss": loss, "val_acc": val_acc})
            log.info("epoch %d: loss %.4f, val acc %.4f", epoch + 1, loss, val_acc)
            run.best.offer(val_acc, model.state_dict())
            run.epoch = epoch + 1
            if context.is_main:
                _save_run(run, checkpoint_dir, config)
            context.barrier()  # no rank runs ahead of a checkpoint it might resume from

    if run.best.state is not None:
        model.load_state_dict(run.best.state)
    model.eval()
    if context.is_main:
        _save_model(run, config, data, run_dir, started)
        if context.is_distributed:
            print_summary("data parallel", {"processes": context.world_size, "backend": context.backend})
    context.barrier()
    return model


def _jsonable(config: BackboneTrainConfig) -> dict[str, Any]:
    return asdict(config)
