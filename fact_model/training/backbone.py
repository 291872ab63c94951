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
from tqdm.auto import tqdm

from fact_model.artifacts import save
from fact_model.bcos.encoding import encode_rgb
from fact_model.config import FaCTConfig
from fact_model.data.loading import TrainingData, shuffled_order
from fact_model.model import FaCTModel
from fact_model.training.checkpoint import load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from fact_model.training.common import accuracy, print_summary, warmup_cosine

__all__ = ["BackboneTrainConfig", "train_backbone"]

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
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)
    start_epoch, best_acc, best_state, history = 0, -1.0, None, []

    checkpoint_dir = run_dir / "checkpoint"
    if checkpoint_dir.exists():
        tensors, meta = load_checkpoint(checkpoint_dir)
        if meta.get("kind") != "backbone" or meta.get("config") != _jsonable(config):
            raise ValueError(
                f"{checkpoint_dir} belongs to a different run (kind/config differ); "
                "use another --out directory or delete it"
            )
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_optimizer(optimizer, tensors, meta["optimizer"])
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        start_epoch, best_acc, history = meta["epoch"], meta["best_acc"], meta["history"]
        log.info("resuming backbone training from epoch %d (best val acc %.4f)", start_epoch, best_acc)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        losses = []
        order = shuffled_order(len(data.train), config.seed, epoch)
        pin = model.device.type == "cuda"
        reader = data.train.batches(config.batch_size, order=order, pin_memory=pin)
        bar = tqdm(
            reader,
            total=steps_per_epoch,
            desc=f"backbone epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for i, batch in enumerate(bar):
            if not len(batch):
                continue  # every item of this batch was unreadable
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, total_steps, warmup)
            images = batch.float_images(model.device)
            if config.flip:
                flip = (torch.rand(len(batch), generator=generator) < 0.5).to(images.device)
                images[flip] = images[flip].flip(-1)
            logits = model.forward_encoded(encode_rgb(images)).logits
            targets = F.one_hot(batch.labels.to(logits.device), model.num_classes).float()
            loss = F.binary_cross_entropy_with_logits(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        val_acc = accuracy(model, data.val)
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "val_acc": val_acc})
        log.info("epoch %d: loss %.4f, val acc %.4f", epoch + 1, history[-1]["loss"], val_acc)
        if val_acc > best_acc:
            best_acc = val_acc
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
        tensors.update(opt_tensors)
        tensors["rng.generator"] = generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {
            "kind": "backbone",
            "config": _jsonable(config),
            "epoch": epoch + 1,
            "best_acc": best_acc,
            "history": history,
            "optimizer": opt_meta,
        }
        save_checkpoint(checkpoint_dir, tensors, meta)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    provenance = {
        "step": "fact train backbone",
        "config": _jsonable(config),
        "data": data.source,
        "history": history,
        "best_val_accuracy": best_acc,
    }
    save(model, run_dir / "model", provenance=provenance, overwrite=True)
    print_summary(
        "backbone training",
        {
            "architecture": config.arch,
            "epochs": config.epochs,
            "best val accuracy": best_acc,
            "final train loss": history[-1]["loss"] if history else float("nan"),
            "seconds (this session)": round(time.perf_counter() - started, 1),
            "artifact": str(run_dir / "model"),
        },
    )
    return model


def _jsonable(config: BackboneTrainConfig) -> dict[str, Any]:
    return asdict(config)
