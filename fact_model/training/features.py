"""Feature collection for concept-layer training (spec section 3).

For every training image the features ``f`` at a stage are taken at a few
positions, sampled with probability ∝ |contribution of that position to the
predicted logit| — in explanation mode, ``Σ_c f_{c,p} ∂y_pred/∂f_{c,p}`` (these sum
to ``y_pred`` over positions) — so that important positions dominate the
dictionary.

Images stream in batches from the split's loader; vectors stream to disk in
safetensors shards of bounded size (float32, or float16 to halve the disk), so
memory does not grow with the number of images. Shard ``j`` holds the vectors of a
fixed range of batches (``batches_per_shard`` consecutive batches of the split, sized
so a shard is about ``shard_bytes``) and is finished when its record
``shard_j.json`` (settings, rows, sha256) sits next to it. Position sampling draws
from a generator seeded per batch, so a shard's bytes depend only on the settings
and ``j`` — not on how many processes collected, nor on what ran before.

That makes collection resumable and shardable in the same way. An interrupted run
redoes only the shards without an intact record (missing, torn, or not matching its
hash). Under ``torchrun`` shard ``j`` is collected by rank ``j mod W`` (every rank
reads its own batches and writes its own shards into the shared directory); after a
barrier rank 0 writes the manifest ``done.json``, so a finished collection is one set
of files whatever the number of processes, and a collection interrupted on one rank —
or on all — resumes on any number of processes. ``done.json`` marks a finished
collection, reused when its settings match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.bcos.encoding import encode_rgb
from fact_model.data.loading import ImageSplit, seeded_generator
from fact_model.distributed import SINGLE_PROCESS, DistributedContext
from fact_model.model import FaCTModel

__all__ = ["FeatureShards", "collect_features", "position_contributions", "sample_positions"]

log = logging.getLogger(__name__)

SHARD_BYTES = 64 * 2**20
"""Default shard size on disk (rows = SHARD_BYTES / (C · bytes per value)): bounds collection and SAE memory."""


def position_contributions(model: FaCTModel, x6: Tensor, layer: str) -> tuple[Tensor, Tensor]:
    """Features at ``layer`` and each position's contribution to the predicted class's ``y``.

    Returns:
        ``features`` ``(N, C, h, w)`` (detached) and ``contributions`` ``(N, h·w)``, which
        sum over positions to ``y_pred`` (dynamic linearity, explanation mode).
    """
    with model.explanation_mode():
        with torch.no_grad():
            features = model.features_at(x6, layer)
        with torch.enable_grad():
            leaf = features.detach().requires_grad_(True)
            scores = model.scores_from(leaf, layer)
            predicted = scores.detach().argmax(dim=1)
            (grad,) = torch.autograd.grad(scores.gather(1, predicted[:, None]).sum(), leaf)
    return features.detach(), (features.detach() * grad).sum(dim=1).flatten(1)


def sample_positions(contributions: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``(N, P)`` contributions → ``(N, n)`` position indices drawn ∝ ``|contribution|``.

    Without replacement when ``n ≤ P``; images whose contributions are all zero are
    sampled uniformly.
    """
    weights = contributions.abs().double()
    empty = weights.sum(dim=1) == 0
    weights[empty] = 1.0
    return torch.multinomial(weights, n, replacement=n > weights.shape[1], generator=generator)


@dataclass(frozen=True)
class FeatureShards:
    """Feature vectors on disk: ``shard_*.safetensors`` each holding ``features`` ``(M, C)`` (float32 or float16).

    Reading always yields float32.
    """

    directory: Path
    paths: tuple[Path, ...]
    count: int
    dim: int
    sizes: tuple[int, ...] = ()

    def steps(self, batch_size: int) -> int:
        """Optimiser steps of one epoch of :meth:`batches` (``⌈count / batch_size⌉``)."""
        return -(-self.count // batch_size)

    def iterate(self, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield shards as float32 (shuffled order, rows shuffled within) when ``generator`` is given."""
        order = (
            torch.randperm(len(self.paths), generator=generator) if generator is not None else range(len(self.paths))
        )
        for i in order:
            shard = load_file(str(self.paths[int(i)]))["features"].float()
            if generator is not None:
                shard = shard[torch.randperm(len(shard), generator=generator)]
            yield shard

    def batches(self, batch_size: int, generator: torch.Generator, buffer_shards: int = 4) -> Iterator[Tensor]:
        """One shuffled epoch in batches of ``batch_size`` float32 vectors (the last one may be shorter).

        Shards are read in a random order into a buffer of ``buffer_shards`` shards whose rows are
        mixed, so a batch draws from several shards while memory stays bounded by the buffer
        (``buffer_shards`` × the shard size), not by the number of vectors.
        """
        carry = torch.empty(0, self.dim)
        buffer: list[Tensor] = []
        shards = self.iterate(generator)
        while True:
            shard = next(shards, None)
            if shard is not None:
                buffer.append(shard)
                if len(buffer) < buffer_shards:
                    continue
            if not buffer:
                break
            pool = torch.cat([carry, *buffer])
            pool = pool[torch.randperm(len(pool), generator=generator)]
            buffer = []
            full = len(pool) // batch_size * batch_size if shard is not None else len(pool)
            yield from pool[:full].split(batch_size)
            carry = pool[full:]
            if shard is None:
                break
        if len(carry):
            yield carry

    def part(self, rank: int, world_size: int) -> FeatureShards:
        """Rank ``rank``'s shards for data-parallel training: shards ``rank, rank + W, …`` (maybe none)."""
        if not self.sizes:
            raise ValueError(f"{self.directory} records no shard sizes; collect the features again")
        keep = range(rank, len(self.paths), world_size)
        sizes = tuple(self.sizes[i] for i in keep)
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in keep), count=sum(sizes), sizes=sizes)

    def squared_norm_sum(self) -> float:
        """``Σ ‖f‖²`` over all vectors (0 for no shards), streamed shard by shard."""
        return sum(float(s.square().sum()) for s in self.iterate())

    def mean_squared_norm(self) -> float:
        """``mean ‖f‖²`` over all vectors (for the global norm factor)."""
        return self.squared_norm_sum() / self.count

    @classmethod
    def open(cls, directory: str | Path) -> FeatureShards:
        """Open a finished collection (raises ``FileNotFoundError`` if it is not finished)."""
        directory = Path(directory)
        marker = directory / "done.json"
        if not marker.is_file():
            raise FileNotFoundError(f"no finished feature collection at {directory}")
        meta = json.loads(marker.read_text())
        paths = tuple(directory / p for p in meta["shards"])
        return cls(directory, paths, meta["count"], meta["dim"], tuple(meta.get("sizes", ())))


_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _record_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard_{index:05d}.json"


def _write_shard(out_dir: Path, index: int, rows: list[Tensor], dtype: torch.dtype, settings: dict) -> dict:
    """Write shard ``index`` (atomically), then its record; returns the record."""
    name = _shard_name(index)
    data = safetensors_save({"features": torch.cat(rows).to(dtype).contiguous()})
    tmp = out_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, out_dir / name)
    rows_written = sum(len(r) for r in rows)
    record = {"settings": settings, "name": name, "rows": rows_written, "sha256": hashlib.sha256(data).hexdigest()}
    _write_json(_record_path(out_dir, index), record)
    return record


def _read_record(out_dir: Path, index: int, settings: dict) -> dict | None:
    """Shard ``index``'s record if there is one for this collection's ``settings``, else ``None``."""
    path = _record_path(out_dir, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        log.warning("unreadable %s; collecting that shard again", path)
        return None
    return record if record.get("settings") == settings else None


def _intact_record(out_dir: Path, index: int, settings: dict) -> dict | None:
    """:func:`_read_record`, and only if the shard on disk matches the record's hash (a resumed run's check)."""
    record = _read_record(out_dir, index, settings)
    if record is None:
        return None
    file = out_dir / _shard_name(index)
    if not file.is_file() or _sha256(file) != record.get("sha256"):
        log.warning("feature shard %s is missing or torn; collecting it again", file)
        return None
    return record


def _feature_dim(model: FaCTModel, layer: str, image_size: int) -> int:
    """Channels ``C`` of the features at ``layer`` (one forward pass of a blank image)."""
    with torch.no_grad():
        blank = encode_rgb(torch.zeros(1, 3, image_size, image_size, device=model.device))
        return int(model.features_at(blank, layer).shape[1])


def _sample_batch(model: FaCTModel, images: Tensor, layer: str, positions_per_image: int, generator) -> Tensor:
    """``(B · positions_per_image, C)`` float32 feature vectors of one batch, positions ∝ |contribution|."""
    features, contributions = position_contributions(model, encode_rgb(images), layer)
    positions = sample_positions(contributions.cpu(), positions_per_image, generator)
    flat = features.flatten(2).transpose(1, 2).cpu()  # (B, P, C)
    picked = flat.gather(1, positions[..., None].expand(-1, -1, flat.shape[-1]))
    return picked.reshape(-1, flat.shape[-1]).float().contiguous()


def collect_features(
    model: FaCTModel,
    split: ImageSplit,
    layer: str,
    out_dir: str | Path,
    positions_per_image: int = 16,
    batch_size: int = 128,
    shard_bytes: int = SHARD_BYTES,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    shard_rows: int | None = None,
    context: DistributedContext = SINGLE_PROCESS,
) -> FeatureShards:
    """Sample feature vectors at stage ``layer`` from ``split`` into shards under ``out_dir``.

    Args:
        split: the images, read batch by batch in split order.
        positions_per_image: vectors sampled per image (∝ |contribution|).
        batch_size: images per forward/backward pass.
        shard_bytes: target size of one shard on disk (``shard_rows`` overrides it with a row count);
            a shard holds whole batches, at least one.
        dtype: ``"float32"`` or ``"float16"`` shards.
        seed: position sampling (per batch, see the module docstring).
        context: under ``torchrun``, every rank calls this with its context and the same arguments;
            ``out_dir`` must be a directory all ranks share (one file system).

    Reuses a finished collection with the same settings and resumes an interrupted one. Concept
    layers below ``layer`` are part of the model, so upper layers see the features the FaCT model
    really computes.

    Raises:
        ValueError: an unknown ``dtype``, or no readable image in the split.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    model.eval()
    dim = _feature_dim(model, layer, split.image_size)
    rows_per_shard = shard_rows or max(1, shard_bytes // (dim * _DTYPES[dtype].itemsize))
    batches_per_shard = max(1, -(-rows_per_shard // (batch_size * positions_per_image)))
    settings = {
        "layer": layer,
        "positions_per_image": positions_per_image,
        "images": len(split),
        "data": split.description,
        "seed": seed,
        "batch_size": batch_size,
        "batches_per_shard": batches_per_shard,
        "dtype": dtype,
    }
    marker = out_dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return FeatureShards.open(out_dir)
    context.barrier()  # every rank has looked at the marker before rank 0 removes a stale one
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
    context.barrier()

    total_batches = -(-len(split) // batch_size)
    total_shards = -(-total_batches // batches_per_shard)
    mine = list(range(context.rank, total_shards, context.world_size))
    todo = [j for j in mine if _intact_record(out_dir, j, settings) is None]
    if len(todo) < len(mine):
        log.info("feature collection at %s: %d of %d shard(s) already intact", layer, len(mine) - len(todo), len(mine))
    # One reader over all of this rank's batches (a loader per shard would restart its workers each time);
    # every shard but the split's last spans whole batches, so batch boundaries stay the split's own.
    plan = [(j, b) for j in todo for b in range(j * batches_per_shard, min(total_batches, (j + 1) * batches_per_shard))]
    order = [p for _, b in plan for p in range(b * batch_size, min(len(split), (b + 1) * batch_size))]
    reader = split.batches(batch_size, order=order, pin_memory=model.device.type == "cuda")
    bar = tqdm(total=len(plan), desc=f"features @ {layer}", disable=not (progress and context.is_main), leave=False)
    rows: list[Tensor] = []
    with bar:
        for step, ((j, batch_index), batch) in enumerate(zip(plan, reader, strict=True)):
            if len(batch):
                images, generator = batch.float_images(model.device), seeded_generator(seed, batch_index)
                rows.append(_sample_batch(model, images, layer, positions_per_image, generator))
            bar.update(1)
            if step + 1 == len(plan) or plan[step + 1][0] != j:  # the shard's last batch
                _write_shard(out_dir, j, rows or [torch.empty(0, dim)], _DTYPES[dtype], settings)
                rows = []
    context.barrier()  # every shard is written

    problem = None
    if context.is_main:
        problem = _write_manifest(out_dir, split, layer, total_shards, dim, dtype, settings)
    problem = context.broadcast_object(problem)  # every rank fails alike, or goes on once the manifest exists
    if problem:
        raise ValueError(problem)
    return FeatureShards.open(out_dir)


def _write_manifest(
    out_dir: Path, split: ImageSplit, layer: str, total_shards: int, dim: int, dtype: str, settings: dict
) -> str | None:
    """Check every shard's record, remove strays, write ``done.json``; returns what went wrong, or ``None``.

    The shards are not hashed again: each was hashed when it was written (or checked when a resumed
    run kept it), and its record is written only after the shard is in place.
    """
    records = [
        _read_record(out_dir, j, settings) if (out_dir / _shard_name(j)).is_file() else None
        for j in range(total_shards)
    ]
    missing = [j for j, r in enumerate(records) if r is None]
    if missing:
        return f"feature shards {missing} at {out_dir} are missing after collection"
    kept = [r for r in records if r is not None and r["rows"]]  # a shard of unreadable images holds nothing
    if not kept:
        return f"no readable image in {split!r}: nothing to collect at {layer}"
    done = {
        "shards": [r["name"] for r in kept],
        "sizes": [r["rows"] for r in kept],
        "count": sum(r["rows"] for r in kept),
        "dim": dim,
        "dtype": dtype,
        "settings": settings,
    }
    ours = {_shard_name(j) for j in range(total_shards)}
    for stray in out_dir.glob("shard_*.safetensors"):  # from an earlier collection with other settings
        if stray.name not in ours:
            stray.unlink()
            stray.with_suffix(".json").unlink(missing_ok=True)
    for leftover in out_dir.glob(".shard_*.tmp"):  # writes cut short by an interruption
        leftover.unlink(missing_ok=True)
    (out_dir / "progress.json").unlink(missing_ok=True)  # an older version's resume record
    _write_json(out_dir / "done.json", done)
    return None
