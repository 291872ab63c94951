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

Under ``torchrun`` the SAE trains data-parallel over the feature shards: rank ``r`` reads
shards ``r, r+W, …`` (:meth:`FeatureShards.part`) in batches of its share of the global
``batch_size``, and every step is the single-process step on the union of the ranks'
batches: the loss is normalised by the global vector count, the firing counts and the
auxiliary loss's denominator are all-reduced before the loss is formed, the gradients are
summed over the ranks, and the radial-gradient removal, clipping, Adam step and
renormalisation then run on identical numbers on every rank, so the layers stay equal. What
differs from one process is only which vectors meet in a batch (each rank shuffles its own
shards), so a run on W processes reaches the single-process quality, not its exact weights.
The epoch's shuffle is seeded by ``(seed, epoch, rank)``, which lets a run resume on any
number of processes; validation is sharded, and rank 0's figure picks the best epoch on
every rank; rank 0 alone writes checkpoints and the model.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.artifacts import save
from fact_model.concept_layer import ConceptCodes, ConceptLayer
from fact_model.config import ConceptLayerSpec
from fact_model.data.loading import TrainingData, seeded_generator
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
from fact_model.training.features import SHARD_BYTES, FeatureShards, collect_features

__all__ = [
    "ConceptTrainConfig",
    "FiringTracker",
    "SAEResult",
    "StepLosses",
    "aux_k_loss",
    "sae_learning_rate",
    "sae_step",
    "train_concepts",
    "train_sae",
    "with_concept_layer",
]

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


def sae_learning_rate(step: int, total_steps: int, config: ConceptTrainConfig) -> float:
    """Adam's learning rate at optimisation step ``step`` (0-based) of ``total_steps``: warm-up, then cosine."""
    return config.lr * warmup_cosine(step, total_steps, config.warmup_steps)


class FiringTracker:
    """Which latents fired how recently (dead latents) and how often in the current epoch.

    Args:
        num_concepts: ``K``.
        dead_after: a latent is dead once it has not fired for more than this many vectors.
        since_fired: ``(K,)`` int64 vectors since each latent last fired (a resumed run's); zeros if ``None``.
    """

    def __init__(self, num_concepts: int, dead_after: int, since_fired: Tensor | None = None) -> None:
        self.dead_after = dead_after
        self.since_fired = since_fired if since_fired is not None else torch.zeros(num_concepts, dtype=torch.long)
        self.fire_counts = torch.zeros(num_concepts, dtype=torch.long)

    def new_epoch(self) -> None:
        """Start counting the epoch's firings from zero (``since_fired`` carries on)."""
        self.fire_counts = torch.zeros_like(self.fire_counts)

    def update(self, codes: ConceptCodes) -> Tensor:
        """Record a batch's codes (a latent fires where its slot value is > 0); returns the ``(K,)`` dead mask."""
        return self.record(firing_counts(codes, len(self.fire_counts)), codes.values[..., 0].numel())

    def record(self, counts: Tensor, vectors: int) -> Tensor:
        """Record a batch of ``vectors`` vectors in which latent ``i`` fired ``counts[i]`` times (``(K,)`` int64,
        summed over the ranks in data-parallel training); returns the ``(K,)`` dead mask."""
        self.fire_counts += counts
        self.since_fired += vectors
        self.since_fired[counts > 0] = 0
        return self.dead()

    def dead(self) -> Tensor:
        """``(K,)`` bool: latents that have not fired for more than ``dead_after`` vectors."""
        return self.since_fired > self.dead_after

    def epoch_counts(self, vectors: int, frequent_threshold: float) -> dict[str, int]:
        """Latents dead in the epoch and now; over-active ones (firing on > ``frequent_threshold`` of ``vectors``)."""
        frequency = self.fire_counts.float() / vectors
        return {
            "dead_in_epoch": int((self.fire_counts == 0).sum()),
            "dead_now": int(self.dead().sum()),
            "over_active": int((frequency > frequent_threshold).sum()),
        }


def firing_counts(codes: ConceptCodes, num_concepts: int) -> Tensor:
    """``(K,)`` int64 on the CPU: how often each latent fired (slot value > 0) in ``codes``."""
    return torch.bincount(codes.indices[codes.values > 0].cpu(), minlength=num_concepts)


def aux_k_loss(
    layer: ConceptLayer,
    pre_activations: Tensor,
    dead: Tensor,
    residual: Tensor,
    aux_k: int,
    denominator: Tensor | None = None,
) -> Tensor:
    """The auxiliary-K loss: how well the ``aux_k`` most active dead latents reconstruct the residual.

    ``‖r − D·TopK_aux(ReLU(E x) ⊙ dead)‖² / ‖r‖²`` over the batch, with the residual
    ``r = x − x̂`` a constant target, so its gradient reaches only the dead latents'
    encoder rows and directions.

    Args:
        layer: the concept layer being trained (its decoder reconstructs).
        pre_activations: ``(B, K)`` ``ReLU(E x)``, part of the autograd graph.
        dead: ``(K,)`` bool, at least one ``True``.
        residual: ``(B, C)`` ``x − x̂`` (detached here).
        aux_k: latents per vector (fewer if fewer are dead).
        denominator: ``‖r‖²`` to divide by (default this batch's); in data-parallel training the
            sum over all ranks, so the ranks' losses add up to the loss of their batches together.

    Returns:
        A scalar tensor (unitless).
    """
    count = min(aux_k, int(dead.sum()))
    values, indices = pre_activations.masked_fill(~dead, 0).topk(count, dim=1)
    codes = ConceptCodes(values[None], indices[None], (len(values),), layer.num_concepts)
    recon = layer.decode(codes)[0]  # (B, C)
    target = residual.detach()
    if denominator is None:
        denominator = target.square().sum()
    return (target - recon).square().sum() / denominator.clamp_min(1e-12)


@dataclass(frozen=True)
class StepLosses:
    """Scalars of one optimisation step: the loss optimised, the batch NMSE and the auxiliary loss (0 if none dead)."""

    loss: float
    nmse: float
    aux: float


def _optimise(
    layer: ConceptLayer,
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    context: DistributedContext = SINGLE_PROCESS,
    report: Tensor | None = None,
) -> Tensor | None:
    """One Adam step on unit-norm directions: radial gradient removed, norm clipped at 1, renormalised.

    With several ranks the gradients (and the small ``report`` tensor riding along) are summed over
    the ranks in one all-reduce first, so every rank applies the same step; returns the summed ``report``.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if context.is_distributed:
        parameters = list(layer.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        pieces = [g.reshape(-1) for g in grads] + ([report.to(grads[0])] if report is not None else [])
        summed = context.all_reduce_sum(torch.cat(pieces))
        sizes = [p.numel() for p in parameters]
        for parameter, flat in zip(parameters, summed[: sum(sizes)].split(sizes), strict=True):
            parameter.grad = flat.view_as(parameter)
        report = summed[sum(sizes) :]
    _remove_parallel_gradient(layer.decoder)
    torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
    optimizer.step()
    _normalise_directions(layer.decoder.data)
    return report


def sae_step(
    layer: ConceptLayer,
    optimizer: torch.optim.Optimizer,
    batch: Tensor,
    firing: FiringTracker,
    config: ConceptTrainConfig,
    context: DistributedContext = SINGLE_PROCESS,
) -> StepLosses:
    """One optimisation step of the TopK SAE on a ``(B, C)`` batch of (scaled) feature vectors.

    Loss: ``mean_b ‖x_b − x̂_b‖² / C`` plus ``aux_weight`` × :func:`aux_k_loss` while
    some latents are dead; ``firing`` is updated with the batch's codes first. Under ``torchrun``
    ``batch`` is this rank's part of the global batch (it may be empty) and the step is the
    single-process step on all ranks' parts together (see the module docstring); the returned
    figures are the global batch's.
    """
    pre = layer.pre_activations(batch[None])  # (1, B, K): the batch as one row of B tokens
    # Sorted slots: the decoder sums the k directions largest first, a summation order
    # that does not depend on which top-k algorithm torch picks for this k and K.
    codes = layer.top_k(pre, sorted=True)
    residual = batch - layer.decode(codes)[0]  # (B, C)
    squared = residual.square().sum()
    # One all-reduce for everything the loss needs from the other ranks: firing counts, vectors, ‖x‖², ‖r‖².
    sums = torch.stack([torch.tensor(float(len(batch)), device=batch.device), batch.square().sum(), squared.detach()])
    local = torch.cat([firing_counts(codes, layer.num_concepts).double(), sums.double().cpu()])
    totals = context.all_reduce_sum(local)
    counts, (vectors, batch_squared, residual_squared) = totals[:-3].long(), totals[-3:].tolist()
    if vectors == 0:
        raise ValueError("an SAE step needs at least one feature vector on some rank")
    dead = firing.record(counts, int(vectors))
    loss = squared / (vectors * layer.in_features)
    aux = torch.zeros((), device=batch.device)
    if dead.any():
        denominator = torch.tensor(residual_squared, device=batch.device)
        aux = aux_k_loss(layer, pre[0], dead, residual, config.aux_k, denominator=denominator)
        loss = loss + config.aux_weight * aux
    report = _optimise(layer, optimizer, loss, context, torch.stack([loss.detach(), aux.detach()]))
    assert report is not None
    total_loss, total_aux = (float(v) for v in report)
    return StepLosses(total_loss, residual_squared / max(batch_squared, 1e-30), total_aux)


class _EpochMeans:
    """Running means of :class:`StepLosses` over an epoch."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "nmse": 0.0, "aux_loss": 0.0}
        self.batches = 0

    def add(self, losses: StepLosses) -> None:
        self.sums["loss"] += losses.loss
        self.sums["nmse"] += losses.nmse
        self.sums["aux_loss"] += losses.aux
        self.batches += 1

    def means(self) -> dict[str, float]:
        return {key: total / self.batches for key, total in self.sums.items()}


@dataclass
class _SAERun:
    """Everything a concept layer's checkpoint restores."""

    layer: ConceptLayer
    optimizer: torch.optim.Optimizer
    firing: FiringTracker
    norm_factor: float
    best: BestEpoch = dataclasses.field(default_factory=BestEpoch)
    epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _checkpoint_meta(spec: ConceptLayerSpec, config: ConceptTrainConfig) -> dict[str, Any]:
    return {"kind": "concepts", "spec": asdict(spec), "config": asdict(config)}


def _resume(run: _SAERun, checkpoint_dir: Path, spec: ConceptLayerSpec, config: ConceptTrainConfig) -> None:
    """Restore ``run`` from ``checkpoint_dir`` (written by :func:`_save_run` for the same spec and config)."""
    tensors, meta = load_checkpoint(checkpoint_dir)
    if any(meta.get(key) != value for key, value in _checkpoint_meta(spec, config).items()):
        raise ValueError(f"{checkpoint_dir} belongs to a different run; use another --out directory or delete it")
    run.layer.load_state_dict(unprefixed("layer", tensors))
    restore_optimizer(run.optimizer, tensors, meta["optimizer"])
    run.best = BestEpoch(meta["best_acc"], unprefixed("best", tensors) or None)
    run.firing.since_fired = tensors["since_fired"]
    run.epoch, run.history, run.norm_factor = meta["epoch"], meta["history"], meta["s"]
    log.info("resuming concept layer %s from epoch %d", spec.layer, run.epoch)


def _save_run(run: _SAERun, checkpoint_dir: Path, spec: ConceptLayerSpec, config: ConceptTrainConfig) -> None:
    """Write ``run`` (after epoch ``run.epoch``) atomically to ``checkpoint_dir``."""
    opt_tensors, opt_meta = optimizer_tensors(run.optimizer)
    tensors = {**prefixed("layer", run.layer.state_dict()), **prefixed("best", run.best.state), **opt_tensors}
    tensors["since_fired"] = run.firing.since_fired
    meta = {
        **_checkpoint_meta(spec, config),
        "epoch": run.epoch,
        "best_acc": run.best.score,
        "history": run.history,
        "optimizer": opt_meta,
        "s": run.norm_factor,
    }
    save_checkpoint(checkpoint_dir, tensors, meta)


def steps_per_epoch(shards: FeatureShards, batch_size: int, context: DistributedContext = SINGLE_PROCESS) -> int:
    """Steps of one epoch: the most any rank needs for its shards in batches of its share of ``batch_size``."""
    if not context.is_distributed:
        return shards.steps(batch_size)
    return max(
        shards.part(rank, context.world_size).steps(
            dataclasses.replace(context, rank=rank).local_batch_size(batch_size)
        )
        for rank in range(context.world_size)
    )


def _train_epoch(
    run: _SAERun,
    shards: FeatureShards,
    config: ConceptTrainConfig,
    epoch: int,
    steps: int,
    bar: tqdm,
    context: DistributedContext,
) -> dict[str, float]:
    """One pass over ``shards`` (this rank's part) in a fresh order; returns the epoch's mean losses.

    Every rank takes ``steps`` steps; a rank whose shards are used up contributes empty batches.
    """
    run.firing.new_epoch()
    means = _EpochMeans()
    mine = shards.part(context.rank, context.world_size) if context.is_distributed else shards
    generator = seeded_generator(config.seed, epoch, context.rank)  # resumable on any number of ranks
    batches = mine.batches(context.local_batch_size(config.batch_size), generator)
    device = run.layer.encoder.device
    empty = torch.empty(0, shards.dim)
    total_steps = steps * config.epochs
    for step in range(epoch * steps, (epoch + 1) * steps):
        unscaled = next(batches, empty).to(device, non_blocking=True)
        set_learning_rate(run.optimizer, sae_learning_rate(step, total_steps, config))
        means.add(sae_step(run.layer, run.optimizer, unscaled * run.norm_factor, run.firing, config, context))
        bar.update(1)
    return means.means()


def _norm_factor(shards: FeatureShards, context: DistributedContext) -> float:
    """``s`` with ``mean ‖s·f‖² = C`` over all vectors; under ``torchrun`` each rank reads only its shards."""
    mine = shards.part(context.rank, context.world_size) if context.is_distributed else shards
    total = float(context.all_reduce_sum(torch.tensor([mine.squared_norm_sum()], dtype=torch.float64))[0])
    return (shards.dim * shards.count / total) ** 0.5


def train_sae(
    shards: FeatureShards,
    spec: ConceptLayerSpec,
    config: ConceptTrainConfig,
    evaluate: Callable[[dict[str, Tensor]], float],
    checkpoint_dir: Path,
    progress: bool = True,
    context: DistributedContext = SINGLE_PROCESS,
    device: str | torch.device | None = None,
) -> SAEResult:
    """Train one concept layer on ``shards``, resuming from ``checkpoint_dir`` if it holds this run.

    Args:
        evaluate: ``(folded_state) -> float`` giving held-out FaCT accuracy with the layer in place
            (called on every rank; rank 0's figure decides the best epoch).
        checkpoint_dir: where this layer's resumable checkpoint lives (rewritten every epoch, by rank 0).
        context: this process's place in a ``torchrun`` launch (see the module docstring).
        device: where a single process trains (default the CPU); under ``torchrun`` the rank's device.

    Returns:
        The best epoch's layer on the CPU, with the norm factor folded in.
    """
    device = torch.device(context.device if context.is_distributed else (device or "cpu"))
    torch.manual_seed(config.seed)
    layer = ConceptLayer(shards.dim, spec.num_concepts, spec.k).to(device)
    run = _SAERun(
        layer=layer,
        optimizer=torch.optim.Adam(layer.parameters(), lr=config.lr),
        firing=FiringTracker(spec.num_concepts, config.dead_after or max(1, shards.count // 2)),
        norm_factor=_norm_factor(shards, context),
    )
    if checkpoint_dir.exists():
        _resume(run, checkpoint_dir, spec, config)
    for parameter in layer.parameters():  # every rank starts from rank 0's weights
        context.broadcast_(parameter.data)
    steps = steps_per_epoch(shards, config.batch_size, context)
    for epoch in range(run.epoch, config.epochs):
        with tqdm(
            total=steps,
            desc=f"SAE {spec.layer} epoch {epoch + 1}/{config.epochs}",
            disable=not (progress and context.is_main),
            leave=False,
        ) as bar:
            means = _train_epoch(run, shards, config, epoch, steps, bar, context)
        state = _folded(layer, run.norm_factor)
        val_acc = float(context.broadcast_object(evaluate(state)))  # rank 0's figure decides, on every rank
        record = {"epoch": epoch + 1, **means, "val_acc": val_acc}
        record.update(run.firing.epoch_counts(shards.count, config.frequent_threshold))
        run.history.append(record)
        log.info(
            "%s epoch %d: nmse %.4f, val acc %.4f, dead %d, over-active %d",
            spec.layer, epoch + 1, record["nmse"], val_acc, record["dead_in_epoch"], record["over_active"],
        )  # fmt: skip
        run.best.offer(val_acc, state)
        run.epoch = epoch + 1
        if context.is_main:
            _save_run(run, checkpoint_dir, spec, config)
        context.barrier()

    result_layer = ConceptLayer(shards.dim, spec.num_concepts, spec.k)
    result_layer.load_state_dict(run.best.state if run.best.state is not None else _folded(layer, run.norm_factor))
    return SAEResult(result_layer, run.norm_factor, run.best.score, run.history)


def train_concepts(
    model: FaCTModel,
    data: TrainingData,
    specs: list[ConceptLayerSpec],
    config: ConceptTrainConfig,
    run_dir: str | Path,
    progress: bool = True,
    context: DistributedContext = SINGLE_PROCESS,
    device: str | torch.device | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> FaCTModel:
    """Add and train concept layers at ``specs`` (backbone frozen); saves ``run_dir/model``.

    Under ``torchrun`` (``context``) the features are collected sharded by rank and the SAE trains
    data-parallel (see the module docstring and :mod:`.features`); ``run_dir`` must be shared by all
    ranks. ``device``: where a single process works (default the model's device); under
    ``torchrun`` the rank's device. ``shard_bytes``: the size of one feature shard on disk (the unit
    of resuming and of dealing work to ranks; the SAE holds four in memory).

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
    device = torch.device(context.device if context.is_distributed else (device or model.device))
    model = model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    started = time.perf_counter()
    backbone_acc = accuracy(model, data.val, concepts=False, context=context)
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
            shard_bytes=shard_bytes,
            context=context,
        )
        candidate = with_concept_layer(model, spec)
        candidate_layer = candidate.concept_layer(spec.layer)
        for parameter in candidate.parameters():
            parameter.requires_grad_(False)

        def evaluate(
            state: dict[str, Tensor], candidate: FaCTModel = candidate, target: ConceptLayer = candidate_layer
        ) -> float:
            target.load_state_dict(state)
            return accuracy(candidate, data.val, context=context)

        checkpoint = run_dir / f"checkpoint_{spec.layer}"
        result = train_sae(shards, spec, config, evaluate, checkpoint, progress, context, device)
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

    fact_acc = accuracy(model, data.val, context=context)
    if not context.is_main:
        context.barrier()  # rank 0 saves the model
        return model
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
    if context.is_distributed:
        summary["processes"] = f"{context.world_size} ({context.backend})"
    print_summary("concept-layer training", summary)
    context.barrier()
    return model
