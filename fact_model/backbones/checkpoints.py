"""Loading a user's locally downloaded B-cos-v2 checkpoint into our backbones.

Nothing is downloaded: the user passes a path. ``.safetensors`` files are read
with ``safetensors``; PyTorch ``.pth``/``.pt`` files with
``torch.load(weights_only=True)``, PyTorch's restricted unpickler that only
rebuilds tensors and plain containers (no code runs from the file).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from fact_model.backbones.staged import StagedBackbone

__all__ = ["load_bcos_v2_checkpoint", "read_state_dict"]

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth``/``.pt`` file, on the CPU.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the restricted unpickler raises several types
        raise ValueError(f"{path} is not a readable PyTorch state dict (weights_only load failed: {err})") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def load_bcos_v2_checkpoint(backbone: StagedBackbone, path: str | Path) -> StagedBackbone:
    """Load a B-cos-v2 checkpoint into ``backbone.net`` with ``strict=True``.

    Use the matching architecture, e.g. ``create_backbone("bcos_v2_resnet50")`` for
    ``resnet_50_long-*.pth``, ``create_backbone("bcos_v2_vitc_s_patch1_14")`` for
    ``bcos_vitc_s_patch1_14-*.pth``. Returns ``backbone`` (modified in place).

    A source model that wraps ``net`` stores its keys under
    ``backbone.checkpoint_prefix`` (bcos's ViTs: ``BcosSequential(vit, LogitLayer)``,
    keys ``0.<key>``); when every key carries that prefix it is stripped. Either way the
    load is strict: no key may be missing or left over.

    Raises:
        ValueError: the checkpoint's keys or shapes do not match the architecture
            (the message names the first offending keys).
    """
    state = read_state_dict(path)
    prefix = backbone.checkpoint_prefix
    if prefix and state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items()}
        log.debug("%s: stripped the source model's key prefix %r", path, prefix)
    try:
        backbone.net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"checkpoint {path} does not match architecture {backbone.arch_name or type(backbone.net).__name__}: {err}"
        ) from err
    return backbone
