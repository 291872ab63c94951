"""Resumable training checkpoints: tensors in safetensors, the rest in JSON, written atomically.

A checkpoint is a directory ``<run>/checkpoint/`` with ``state.safetensors`` (model
and optimiser tensors, RNG state) and ``state.json`` (epoch, step, best score,
optimiser hyper-parameters, the sha256 of the tensors file). It is written into a
temporary sibling and renamed into place, so a crash leaves either the previous
checkpoint or the new one — never a half-written file. Loading verifies the hash
and refuses a corrupt or truncated checkpoint with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

__all__ = ["CheckpointError", "load_checkpoint", "optimizer_tensors", "restore_optimizer", "save_checkpoint"]

_TENSORS = "state.safetensors"
_META = "state.json"


class CheckpointError(ValueError):
    """A checkpoint is missing pieces, corrupt or truncated (the message names the file)."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and JSON ``meta`` to ``directory`` (replacing a previous checkpoint)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    data = safetensors_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    record = {**meta, "tensors_sha256": hashlib.sha256(data).hexdigest(), "tensors_bytes": len(data)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        _fsync_write(tmp / _TENSORS, data)
        _fsync_write(tmp / _META, (json.dumps(record, indent=2) + "\n").encode())
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(directory, old)
        os.rename(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: a file is missing, the JSON is unreadable, or the tensors file
            does not match its recorded sha256 (corrupt or truncated).
    """
    directory = Path(directory)
    meta_path, tensors_path = directory / _META, directory / _TENSORS
    if not meta_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(f"incomplete checkpoint at {directory}: expected {_META} and {_TENSORS}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_path} is unreadable: {err}") from err
    data = tensors_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"checkpoint {tensors_path} is corrupt or truncated ({len(data)} bytes, sha256 {digest[:12]}…; "
            f"expected {meta.get('tensors_bytes')} bytes, sha256 {str(meta.get('tensors_sha256'))[:12]}…); "
            "delete the checkpoint directory to start the run afresh"
        )
    return safetensors_load(data), meta


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimiser's state into named tensors plus JSON-able hyper-parameters."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim"
) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
