"""Feature collection for concept-layer training (spec section 3).

For every training image the features ``f`` at a stage are taken at a few
positions, sampled with probability ∝ |contribution of that position to the
predicted logit| — in explanation mode, ``Σ_c f_{c,p} ∂y_pred/∂f_{c,p}`` (these sum
to ``y_pred`` over positions) — so that important positions dominate the
dictionary. Vectors stream to disk in fixed-size safetensors shards instead of
one giant tensor; a ``done.json`` marker makes a finished collection reusable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.bcos.encoding import encode_rgb
from fact_model.model import FaCTModel
from fact_model.training.common import as_float, batches

__all__ = ["FeatureShards", "collect_features", "position_contributions", "sample_positions"]


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
    """Feature vectors on disk: ``shard_*.safetensors`` each holding ``features`` ``(M, C)`` float32."""

    directory: Path
    paths: tuple[Path, ...]
    count: int
    dim: int
    sizes: tuple[int, ...] = ()

    def steps(self, batch_size: int) -> int:
        """Optimiser steps of one epoch in batches of ``batch_size`` (batches never span shards)."""
        sizes = self.sizes or tuple(len(shard) for shard in self.iterate())
        return sum(-(-size // batch_size) for size in sizes)

    def iterate(self, generator: torch.Generator | None = None) -> Iterator[Tensor]:
        """Yield shards (shuffled order, rows shuffled within) when ``generator`` is given."""
        order = (
            torch.randperm(len(self.paths), generator=generator) if generator is not None else range(len(self.paths))
        )
        for i in order:
            shard = load_file(str(self.paths[int(i)]))["features"]
            if generator is not None:
                shard = shard[torch.randperm(len(shard), generator=generator)]
            yield shard

    def mean_squared_norm(self) -> float:
        """``mean ‖f‖²`` over all vectors (for the global norm factor)."""
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


def _write_shard(directory: Path, index: int, rows: list[Tensor]) -> tuple[str, int]:
    name = f"shard_{index:05d}.safetensors"
    tmp = directory / f".{name}.tmp"
    features = torch.cat(rows).contiguous()
    save_file({"features": features}, str(tmp))
    os.replace(tmp, directory / name)
    return name, len(features)


def collect_features(
    model: FaCTModel,
    images: Tensor,
    layer: str,
    out_dir: str | Path,
    positions_per_image: int = 16,
    batch_size: int = 128,
    shard_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
) -> FeatureShards:
    """Sample feature vectors at stage ``layer`` from uint8 ``images`` into shards under ``out_dir``.

    Reuses a finished collection with the same settings. Concept layers below
    ``layer`` are part of the model, so upper layers see the features the FaCT model
    really computes.
    """
    out_dir = Path(out_dir)
    settings = {"layer": layer, "positions_per_image": positions_per_image, "images": len(images), "seed": seed}
    try:
        existing = FeatureShards.open(out_dir)
        if json.loads((out_dir / "done.json").read_text()).get("settings") == settings:
            return existing
    except FileNotFoundError:
        pass
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "done.json").unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    pending: list[Tensor] = []
    pending_rows, shards, count, dim = 0, [], 0, 0
    for idx in tqdm(
        list(batches(len(images), batch_size)), desc=f"features @ {layer}", disable=not progress, leave=False
    ):
        features, contributions = position_contributions(model, encode_rgb(as_float(images[idx])), layer)
        positions = sample_positions(contributions, positions_per_image, generator)  # (B, n)
        flat = features.flatten(2).transpose(1, 2)  # (B, P, C)
        picked = flat.gather(1, positions[..., None].expand(-1, -1, flat.shape[-1])).reshape(-1, flat.shape[-1])
        dim = picked.shape[1]
        pending.append(picked.float().contiguous())
        pending_rows += len(picked)
        count += len(picked)
        if pending_rows >= shard_size:
            shards.append(_write_shard(out_dir, len(shards), pending))
            pending, pending_rows = [], 0
    if pending:
        shards.append(_write_shard(out_dir, len(shards), pending))
    marker = {
        "shards": [name for name, _ in shards],
        "sizes": [size for _, size in shards],
        "count": count,
        "dim": dim,
        "settings": settings,
    }
    (out_dir / "done.json").write_text(json.dumps(marker, indent=2) + "\n")
    return FeatureShards.open(out_dir)
