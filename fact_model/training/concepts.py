"""Train the bias-free TopK concept layers of a FaCT model (``fact train concepts``; spec section 3).

For each concept layer, lowest first (so an upper layer learns from the features
the FaCT model really computes with the lower concept layer in place):

1. collect features at the layer, positions sampled ∝ |contribution| (:mod:`.features`);
2. scale them by one global factor ``s`` so that ``mean ‖s·f‖² = C``;
3. train the TopK SAE on ``s·f`` with the backbone frozen: ``‖x − D·TopK(ReLU(E x))‖²``
   plus the auxiliary-K loss (the residual reconstructed from the ``aux_k`` most
   active *dead* latents, weight 1/32) that revives dead concepts; unit-norm decoder
   directions, renormalised after every step, with the gradient component parallel
   to each direction removed; ``E`` initialised as ``Dᵀ``; Adam with warm-up and
   cosine decay; gradient norm clipped at 1;
4. every epoch, fold ``s`` into the weights (``E ← s·E``, ``D ← D/s``), measure the
   FaCT model's held-out accuracy and keep the best epoch.

Dead latents (none of the last ``dead_after`` vectors fired them) and over-active
latents (firing on more than ``frequent_threshold`` of the vectors in an epoch)
are logged. Resumable per layer through atomic checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.artifacts import save
from fact_model.concept_layer import ConceptLayer
from fact_model.config import ConceptLayerSpec
from fact_model.data.loading import TrainingData
from fact_model.model import FaCTModel
from fact_model.training.checkpoint import load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from fact_model.training.common import accuracy, print_summary, warmup_cosine
from fact_model.training.features import FeatureShards, collect_features

__all__ = ["ConceptTrainConfig", "SAEResult", "train_concepts", "train_sae", "with_concept_layer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptTrainConfig:
    """Hyper-parameters of concept-layer training (shared by all layers of a run).

    Attributes:
        positions_per_image: feature vectors sampled per training image and layer.
        epochs, batch_size, lr: SAE optimisation (Adam); ``warmup_steps`` of linear warm-up.
        aux_k, aux_weight: auxiliary-K loss on dead latents.
        dead_after: a latent is dead when it has not fired for this many vectors
            (``None``: half an epoch).
        frequent_threshold: fraction of vectors above which a latent counts as over-active.
        feature_dtype: ``"float32"`` or ``"float16"`` feature shards on disk (half the space).
        seed: sampling and shuffling.
    """

    positions_per_image: int = 16
    epochs: int = 10
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    aux_k: int = 64
    aux_weight: float = 1 / 32
    dead_after: int | None = None
    frequent_threshold: float = 0.5
    feature_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("positions_per_image", "epochs", "batch_size", "aux_k"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")


@dataclass
class SAEResult:
    """A trained concept layer (norm factor folded in) and its training record."""

    layer: ConceptLayer
    norm_factor: float
    best_val_accuracy: float
    history: list[dict[str, Any]]


def _remove_parallel_gradient(directions: Tensor) -> None:
    """Project out of each direction's gradient its component along the (unit) direction.

    The directions are renormalised after the step anyway; removing the radial part
    first keeps Adam's moments from chasing a change that the renormalisation undoes.
    """
    if directions.grad is not None:
        radial = (directions.grad * directions.data).sum(dim=1, keepdim=True)
        directions.grad.sub_(radial * directions.data)


@torch.no_grad()
def _normalise_directions(directions: Tensor) -> None:
    directions.div_(directions.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _folded(layer: ConceptLayer, norm_factor: float) -> dict[str, Tensor]:
    """State dict of ``layer`` acting on unscaled features: ``E ← s·E``, ``Dᵀ ← Dᵀ/s``."""
    return {"encoder": layer.encoder.detach() * norm_factor, "decoder": layer.decoder.detach() / norm_factor}


def with_concept_layer(model: FaCTModel, spec: ConceptLayerSpec) -> FaCTModel:
    """A new model: ``model`` plus a (randomly initialised) concept layer at ``spec.layer``."""
    existing = [s.layer for s in model.config.concept_layers]
    if spec.layer in existing:
        raise ValueError(f"the model already has a concept layer at {spec.layer!r}")
    config = dataclasses.replace(model.config, concept_layers=(*model.config.concept_layers, spec))
    new = FaCTModel(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("concepts.") for k in missing), (missing, unexpected)
    return new.to(model.device).eval()


def train_sae(
    shards: FeatureShards,
    spec: ConceptLayerSpec,
    config: ConceptTrainConfig,
    evaluate: Any,
    checkpoint_dir: Path,
    progress: bool = True,
) -> SAEResult:
    """Train one concept layer on ``shards``.

    Args:
        evaluate: callable ``(folded_state) -> float`` giving held-out FaCT accuracy
            with the layer in place.
        checkpoint_dir: where this layer's resumable checkpoint lives.
    """
    torch.manual_seed(config.seed)
    k_total, dim = spec.num_concepts, shards.dim
    layer = ConceptLayer(dim, k_total, spec.k)
    norm_factor = (dim / shards.mean_squared_norm()) ** 0.5
    optimizer = torch.optim.Adam(layer.parameters(), lr=config.lr)
    steps_per_epoch = shards.steps(config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    dead_after = config.dead_after or max(1, shards.count // 2)
    since_fired = torch.zeros(k_total, dtype=torch.long)
    generator = torch.Generator().manual_seed(config.seed)
    start_epoch, best_acc, best_state, history = 0, -1.0, None, []

    if checkpoint_dir.exists():
        tensors, meta = load_checkpoint(checkpoint_dir)
        if meta.get("kind") != "concepts" or meta.get("spec") != asdict(spec) or meta.get("config") != asdict(config):
            raise ValueError(f"{checkpoint_dir} belongs to a different run; use another --out directory or delete it")
        layer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("layer.")})
        restore_optimizer(optimizer, tensors, meta["optimizer"])
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        since_fired = tensors["since_fired"]
        generator.set_state(tensors["rng.generator"])
        start_epoch, best_acc, history, norm_factor = meta["epoch"], meta["best_acc"], meta["history"], meta["s"]
        log.info("resuming concept layer %s from epoch %d", spec.layer, start_epoch)

    for epoch in range(start_epoch, config.epochs):
        fire_counts = torch.zeros(k_total, dtype=torch.long)
        sums = {"loss": 0.0, "nmse": 0.0, "aux": 0.0, "batches": 0}
        step = epoch * steps_per_epoch
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"SAE {spec.layer} epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for unscaled in shards.batches(config.batch_size, generator):
            batch = unscaled * norm_factor
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, total_steps, config.warmup_steps)
            pre = F.relu(batch @ layer.encoder.t())  # (B, K)
            values, indices = pre.topk(spec.k, dim=1)
            recon = F.embedding_bag(indices, layer.decoder, per_sample_weights=values, mode="sum")
            residual = batch - recon
            loss = residual.square().sum(dim=1).mean() / dim
            nmse = residual.detach().square().sum() / batch.square().sum()

            fired = torch.zeros(k_total, dtype=torch.bool)
            fired[indices[values > 0]] = True
            fire_counts += torch.bincount(indices[values > 0], minlength=k_total)
            since_fired += len(batch)
            since_fired[fired] = 0
            dead = since_fired > dead_after
            aux = torch.zeros(())
            if dead.any():
                aux_k = min(config.aux_k, int(dead.sum()))
                aux_values, aux_indices = pre.masked_fill(~dead, 0).topk(aux_k, dim=1)
                aux_recon = F.embedding_bag(aux_indices, layer.decoder, per_sample_weights=aux_values, mode="sum")
                target = residual.detach()
                aux = (target - aux_recon).square().sum() / target.square().sum().clamp_min(1e-12)
                loss = loss + config.aux_weight * aux

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _remove_parallel_gradient(layer.decoder)
            torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
            optimizer.step()
            _normalise_directions(layer.decoder.data)
            sums["loss"] += loss.item()
            sums["nmse"] += float(nmse)
            sums["aux"] += aux.item()
            sums["batches"] += 1
            step += 1
            bar.update(1)
        bar.close()
        state = _folded(layer, norm_factor)
        val_acc = evaluate(state)
        frequency = fire_counts.float() / shards.count
        record = {
            "epoch": epoch + 1,
            "loss": sums["loss"] / sums["batches"],
            "nmse": sums["nmse"] / sums["batches"],
            "aux_loss": sums["aux"] / sums["batches"],
            "val_acc": val_acc,
            "dead_in_epoch": int((fire_counts == 0).sum()),
            "dead_now": int((since_fired > dead_after).sum()),
            "over_active": int((frequency > config.frequent_threshold).sum()),
        }
        history.append(record)
        log.info(
            "%s epoch %d: nmse %.4f, val acc %.4f, dead %d, over-active %d",
            spec.layer, epoch + 1, record["nmse"], val_acc, record["dead_in_epoch"], record["over_active"],
        )  # fmt: skip
        if val_acc > best_acc:
            best_acc, best_state = val_acc, {k: v.clone() for k, v in state.items()}
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        tensors = {f"layer.{k}": v for k, v in layer.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
        tensors.update(opt_tensors)
        tensors["since_fired"] = since_fired
        tensors["rng.generator"] = generator.get_state()
        meta = {
            "kind": "concepts",
            "spec": asdict(spec),
            "config": asdict(config),
            "epoch": epoch + 1,
            "best_acc": best_acc,
            "history": history,
            "optimizer": opt_meta,
            "s": norm_factor,
        }
        save_checkpoint(checkpoint_dir, tensors, meta)

    result_layer = ConceptLayer(dim, k_total, spec.k)
    result_layer.load_state_dict(best_state if best_state is not None else _folded(layer, norm_factor))
    return SAEResult(result_layer, norm_factor, best_acc, history)


def train_concepts(
    model: FaCTModel,
    data: TrainingData,
    specs: list[ConceptLayerSpec],
    config: ConceptTrainConfig,
    run_dir: str | Path,
    progress: bool = True,
) -> FaCTModel:
    """Add and train concept layers at ``specs`` (backbone frozen); saves ``run_dir/model``.

    Raises:
        ValueError: a layer name the backbone does not have (the message lists the
            valid ones), or a layer that already has a concept layer.
    """
    run_dir = Path(run_dir)
    stage_order = {name: i for i, name in enumerate(model.backbone.stage_names)}
    for spec in specs:
        if spec.layer not in stage_order:
            raise ValueError(
                f"cannot train a concept layer at {spec.layer!r}: the backbone {model.config.backbone!r} "
                f"has stages {list(model.backbone.stage_names)}"
            )
    backbone_manifest = getattr(model, "manifest", None) or {}
    model = model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    started = time.perf_counter()
    backbone_acc = accuracy(model, data.val, concepts=False)
    summary: dict[str, object] = {"backbone val accuracy": backbone_acc}
    records = []
    for spec in sorted(specs, key=lambda s: stage_order[s.layer]):
        shards = collect_features(
            model,
            data.train,
            spec.layer,
            run_dir / "features" / spec.layer,
            positions_per_image=config.positions_per_image,
            dtype=config.feature_dtype,
            seed=config.seed,
            progress=progress,
        )
        candidate = with_concept_layer(model, spec)
        candidate_layer = candidate.concept_layer(spec.layer)
        for parameter in candidate.parameters():
            parameter.requires_grad_(False)

        def evaluate(
            state: dict[str, Tensor], candidate: FaCTModel = candidate, target: ConceptLayer = candidate_layer
        ) -> float:
            target.load_state_dict(state)
            return accuracy(candidate, data.val)

        result = train_sae(shards, spec, config, evaluate, run_dir / f"checkpoint_{spec.layer}", progress=progress)
        candidate_layer.load_state_dict(result.layer.state_dict())
        model = candidate
        summary[f"{spec.layer}: K / k"] = f"{spec.num_concepts} / {spec.k}"
        summary[f"{spec.layer}: vectors"] = shards.count
        summary[f"{spec.layer}: best val accuracy"] = result.best_val_accuracy
        summary[f"{spec.layer}: final nmse"] = result.history[-1]["nmse"]
        summary[f"{spec.layer}: dead / over-active"] = (
            f"{result.history[-1]['dead_in_epoch']} / {result.history[-1]['over_active']}"
        )
        records.append({"spec": asdict(spec), "norm_factor": result.norm_factor, "history": result.history})

    fact_acc = accuracy(model, data.val)
    summary["FaCT val accuracy"] = fact_acc
    summary["seconds (this session)"] = round(time.perf_counter() - started, 1)
    provenance = {
        "step": "fact train concepts",
        "config": asdict(config),
        "data": data.source,
        "layers": records,
        "backbone_val_accuracy": backbone_acc,
        "fact_val_accuracy": fact_acc,
        "backbone_provenance": backbone_manifest.get("provenance"),
    }
    save(model, run_dir / "model", provenance=provenance, overwrite=True)
    summary["artifact"] = str(run_dir / "model")
    print_summary("concept-layer training", summary)
    return model
