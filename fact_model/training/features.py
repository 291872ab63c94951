"""Feature collection for concept-layer training (spec section 3).

For every training image the features ``f`` at a stage are taken at a few
positions, sampled with probability ∝ |contribution of that position to the
predicted logit| — in explanation mode, ``Σ_c f_{c,p} ∂y_pred/∂f_{c,p}`` (these sum
to ``y_pred`` over positions) — so that important positions dominate the
dictionary.

Images stream in batches from the split's loader; vectors stream to disk in
safetensors shards of bounded size (float32, or float16 to halve the disk), so
memory does not grow with the number of images. Collection is resumable: after
every shard ``progress.json`` records the shards written so far (rows, sha256, the
last batch each covers), and an interrupted run continues after the last complete
shard — a shard that is missing, torn or does not match its hash is redone. Position
sampling draws from a generator seeded per batch, so a resumed collection writes
exactly the shards an uninterrupted one writes. ``done.json`` marks a finished
collection, reused when its settings match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.bcos.encoding import encode_rgb
from fact_model.data.loading import ImageSplit
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

    def mean_squared_norm(self) -> float:
        """``mean ‖f‖²`` over all vectors (for the global norm factor), streamed shard by shard."""
        total = sum(float(s.square().sum()) for s in self.iterate())
        return total / self.count

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


_PROGRESS = "progress.json"
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


def _write_shard(directory: Path, index: int, rows: list[Tensor], dtype: torch.dtype, end_batch: int) -> dict:
    name = f"shard_{index:05d}.safetensors"
    tmp = directory / f".{name}.tmp"
    features = torch.cat(rows).to(dtype).contiguous()
    save_file({"features": features}, str(tmp))
    os.replace(tmp, directory / name)
    return {"name": name, "rows": len(features), "end_batch": end_batch, "sha256": _sha256(directory / name)}


def _complete_shards(out_dir: Path, settings: dict) -> list[dict]:
    """The shards of an interrupted collection with the same settings that are intact, in order."""
    path = out_dir / _PROGRESS
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
    except ValueError:
        log.warning("unreadable %s; restarting the feature collection", path)
        return []
    if record.get("settings") != settings:
        return []
    good = []
    for shard in record.get("shards", []):
        file = out_dir / shard["name"]
        if not file.is_file() or _sha256(file) != shard["sha256"]:
            log.warning("feature shard %s is missing or torn; collecting again from there", file)
            break
        good.append(shard)
    return good


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + batch_index) % (2**63))


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
) -> FeatureShards:
    """Sample feature vectors at stage ``layer`` from ``split`` into shards under ``out_dir``.

    Args:
        split: the images, read batch by batch in split order.
        positions_per_image: vectors sampled per image (∝ |contribution|).
        batch_size: images per forward/backward pass.
        shard_bytes: target size of one shard on disk (``shard_rows`` overrides it with a row count).
        dtype: ``"float32"`` or ``"float16"`` shards.
        seed: position sampling (per batch, see the module docstring).

    Reuses a finished collection with the same settings and resumes an interrupted one.
    Concept layers below ``layer`` are part of the model, so upper layers see the features the
    FaCT model really computes.

    Raises:
        ValueError: an unknown ``dtype``, or no readable image in the split.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    settings = {
        "layer": layer,
        "positions_per_image": positions_per_image,
        "images": len(split),
        "data": split.description,
        "seed": seed,
        "batch_size": batch_size,
        "dtype": dtype,
    }
    marker = out_dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        return FeatureShards.open(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    shards = _complete_shards(out_dir, settings)
    for stale in out_dir.glob("shard_*.safetensors"):  # from another run, or after the last intact shard
        if stale.name not in {s["name"] for s in shards}:
            stale.unlink()
    start_batch = shards[-1]["end_batch"] if shards else 0
    if start_batch:
        log.info("resuming feature collection at %s after %d shard(s) (batch %d)", layer, len(shards), start_batch)
    model.eval()
    pending: list[Tensor] = []
    pending_rows, dim, rows_per_shard = 0, 0, shard_rows
    total_batches = -(-len(split) // batch_size)
    reader = split.batches(batch_size, start_batch=start_batch, pin_memory=model.device.type == "cuda")
    bar = tqdm(
        reader, total=total_batches, initial=start_batch, desc=f"features @ {layer}", disable=not progress, leave=False
    )
    for batch_index, batch in enumerate(bar, start=start_batch):
        if len(batch):
            x6 = encode_rgb(batch.float_images(model.device))
            features, contributions = position_contributions(model, x6, layer)
            positions = sample_positions(contributions.cpu(), positions_per_image, _batch_generator(seed, batch_index))
            flat = features.flatten(2).transpose(1, 2).cpu()  # (B, P, C)
            picked = flat.gather(1, positions[..., None].expand(-1, -1, flat.shape[-1])).reshape(-1, flat.shape[-1])
            dim = picked.shape[1]
            if rows_per_shard is None:
                rows_per_shard = max(1, shard_bytes // (dim * _DTYPES[dtype].itemsize))
            pending.append(picked.float().contiguous())
            pending_rows += len(picked)
        if rows_per_shard is not None and pending_rows >= rows_per_shard:
            shards.append(_write_shard(out_dir, len(shards), pending, _DTYPES[dtype], batch_index + 1))
            _write_json(out_dir / _PROGRESS, {"settings": settings, "shards": shards})
            pending, pending_rows = [], 0
    if pending:
        shards.append(_write_shard(out_dir, len(shards), pending, _DTYPES[dtype], total_batches))
    if not shards:
        raise ValueError(f"no readable image in {split!r}: nothing to collect at {layer}")
    if not dim:
        dim = int(load_file(str(out_dir / shards[0]["name"]))["features"].shape[1])
    done = {
        "shards": [s["name"] for s in shards],
        "sizes": [s["rows"] for s in shards],
        "count": sum(s["rows"] for s in shards),
        "dim": dim,
        "dtype": dtype,
        "settings": settings,
    }
    _write_json(marker, done)
    (out_dir / _PROGRESS).unlink(missing_ok=True)
    return FeatureShards.open(out_dir)
