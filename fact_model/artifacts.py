"""FaCT model artifacts: a directory with safetensors weights and a JSON manifest.

An artifact is a directory holding two files::

    <artifact>/
      model.safetensors   the model's state_dict (safetensors: no pickle, no code runs on load)
      manifest.json       format, format_version, the model configuration, a summary
                          (concept layers, classes, logit bias/temperature, B, input size),
                          provenance, and the weights file's name, sha256 and size

:func:`save` writes the directory into a temporary sibling first (files fsync'ed) and
then renames it into place, so an existing artifact is never lost or left half
written. :func:`load` checks the manifest, verifies the weights' sha256 *before*
parsing them, rebuilds the architecture from the recorded
:class:`~fact_model.config.FaCTConfig` and loads the weights with ``strict=True``.
Every problem with an artifact raises :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from fact_model._files import fsync_dir
from fact_model.config import FaCTConfig
from fact_model.model import FaCTModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "load",
    "read_manifest",
    "read_recorded_file",
    "resolve_artifact_path",
    "save",
    "weights_sha256",
]

FORMAT = "fact-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_NAME = "default"

_CHUNK = 1 << 20  # 1 MiB
_REQUIRED_FIELDS = ("format", "format_version", "model", "weights")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Manifest summary fields that load() cross-checks against the rebuilt model when present.
_SUMMARY_FIELDS = ("concept_layers", "num_classes", "logit_bias", "logit_temperature", "B", "input_size")


class ArtifactError(ValueError):
    """An artifact is missing, malformed, corrupted or inconsistent (the message names the file)."""


# ---------------------------------------------------------------------------- paths
def resolve_artifact_path(path_or_name: str | Path) -> Path:
    """The directory of an artifact given by path, or by the name ``"default"``.

    Only the exact string ``"default"`` means the model shipped with the package
    (``fact_model/weights/default``); a :class:`~pathlib.Path` is always a path.

    Raises:
        ArtifactError: ``"default"`` was asked for but this installation ships no model.
    """
    if isinstance(path_or_name, str) and path_or_name == DEFAULT_NAME:
        import fact_model

        default_dir = Path(fact_model.__file__).parent / "weights" / DEFAULT_NAME
        if not default_dir.is_dir():
            raise ArtifactError(
                f"no default model is shipped in this installation ({default_dir} does not exist); "
                "load a saved artifact by its directory path instead"
            )
        return default_dir
    return Path(path_or_name)


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- save
def _summary(model: FaCTModel) -> dict[str, Any]:
    """The manifest's human-readable summary of ``model`` (also cross-checked on load)."""
    return {
        "concept_layers": [
            {"name": i.name, "num_concepts": i.num_concepts, "k": i.k, "in_features": i.in_features}
            for i in model.concept_layers
        ],
        "num_classes": model.num_classes,
        "logit_bias": model.logit_bias,
        "logit_temperature": model.logit_temperature,
        "B": model.backbone.head.b,
        "input_size": model.config.preprocessing.input_size,
    }


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def save(
    model: FaCTModel,
    path: str | Path,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an artifact directory at ``path``.

    The files are written into a temporary sibling directory, fsync'ed, and the
    directory is then renamed to ``path``. With ``overwrite=True`` an existing
    directory is first renamed aside, the new one moved in, and the old one deleted
    only once the new one is in place (it is restored if the move fails).

    Args:
        model: the model to save (any device; tensors are copied to the CPU).
        path: the artifact directory; its parent is created if needed.
        provenance: JSON-serialisable facts about where the model came from (data,
            training run, …). ``created_at`` (ISO-8601, UTC), ``fact_model_version``
            and ``torch_version`` are added and take precedence over same-named keys.
        overwrite: replace an existing non-empty directory at ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``path`` is a non-empty directory and ``overwrite`` is False,
            or ``path`` exists and is not a directory.
        TypeError: ``provenance`` or the model configuration is not JSON-serialisable.
    """
    import fact_model

    path = Path(path)
    target = Path(os.path.abspath(path))
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise FileExistsError(f"cannot save an artifact to {path}: it exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(
                f"cannot save an artifact to {path}: the directory exists and is not empty; "
                "pass overwrite=True to replace it, or choose another path"
            )

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        **_summary(model),
        "provenance": {
            **dict(provenance or {}),
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "fact_model_version": fact_model.__version__,
            "torch_version": torch.__version__,
        },
    }
    try:  # fail before touching the disk if the manifest cannot be written
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"the manifest of {path} is not JSON-serialisable (check provenance): {err}") from err

    # Contiguous, memory-independent CPU copies (safetensors refuses shared or strided tensors).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights_bytes = _safetensors_save(state, metadata={"format": "pt"})

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an artifact is meant to be read by services
    try:
        weights_path = tmp / WEIGHTS_FILE
        _write_file(weights_path, weights_bytes)
        manifest["weights"] = {
            "file": WEIGHTS_FILE,
            "sha256": weights_sha256(weights_path),  # of the bytes actually on disk
            "bytes": weights_path.stat().st_size,
        }
        text = json.dumps(manifest, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        _write_file(tmp / MANIFEST_FILE, text.encode("utf-8"))
        fsync_dir(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, setting an existing ``target`` aside until the rename succeeds."""
    parent = target.parent
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        fsync_dir(parent)
        return
    old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous artifact back
        raise
    fsync_dir(parent)
    try:
        _remove_tree(old)
    except OSError as err:  # the new artifact is in place; leftovers are only clutter
        warnings.warn(f"saved {target}, but could not remove the previous artifact at {old}: {err}", stacklevel=3)


# ---------------------------------------------------------------------------- load
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of the artifact at ``path`` (a directory, or ``"default"``).

    Raises:
        ArtifactError: the directory or ``manifest.json`` is missing, the JSON is invalid,
            ``format``/``format_version`` are wrong, or a required field is missing.
    """
    directory = resolve_artifact_path(path)
    if not directory.exists():
        raise ArtifactError(f"artifact directory not found: {directory}")
    if not directory.is_dir():
        raise ArtifactError(f"not an artifact directory: {directory} is a file")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} not found: {directory} is not a FaCT artifact")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{manifest_path} is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}")
    missing = [f for f in _REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks required field(s) {missing}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"{manifest_path} has format {manifest['format']!r}, expected {FORMAT!r}")
    version = manifest["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has unsupported format_version {version!r}; this fact_model reads {FORMAT_VERSION}"
        )
    if not isinstance(manifest["model"], dict):
        raise ArtifactError(f"{manifest_path}: field 'model' must be an object")
    weights = manifest["weights"]
    if not isinstance(weights, dict) or not {"file", "sha256"} <= weights.keys():
        raise ArtifactError(f"{manifest_path}: field 'weights' must be an object with 'file' and 'sha256'")
    name = weights["file"]
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ArtifactError(f"{manifest_path}: weights file {name!r} must be a plain file name in the artifact")
    if not isinstance(weights["sha256"], str) or not _SHA256_RE.match(weights["sha256"]):
        raise ArtifactError(f"{manifest_path}: weights sha256 {weights['sha256']!r} is not a lowercase hex digest")
    return manifest


def read_recorded_file(directory: Path, record: dict[str, Any], what: str, remedy: str) -> bytes:
    """The bytes of a file the manifest records (``file``, ``sha256``, optional ``bytes``), verified.

    The very bytes that were hashed are returned, so the file cannot change between the
    check and its use.

    Raises:
        ArtifactError: the file is missing or its sha256 differs (the message ends with ``remedy``).
    """
    path = directory / record["file"]
    if not path.is_file():
        raise ArtifactError(f"{what} {path} not found (listed in {directory / MANIFEST_FILE})")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != record["sha256"]:
        size = ""
        if isinstance(record.get("bytes"), int) and record["bytes"] != len(data):
            size = f" (and is {len(data)} bytes, not {record['bytes']})"
        raise ArtifactError(
            f"{what} {path} has sha256 {actual} but the manifest records {record['sha256']}{size}: {remedy}"
        )
    return data


def _read_verified_weights(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read the weights file once, check its sha256 against the manifest, then parse those bytes."""
    weights_path = directory / manifest["weights"]["file"]
    data = read_recorded_file(
        directory, manifest["weights"], "weights file", "the file was modified or corrupted; refusing to load"
    )
    try:
        return _safetensors_load(data)
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"weights file {weights_path} is not a readable safetensors file: {err}") from err


def _check_summary(manifest: dict[str, Any], model: FaCTModel, manifest_path: Path) -> None:
    expected = json.loads(json.dumps(_summary(model)))  # as it would read back from JSON
    for key in _SUMMARY_FIELDS:
        if key in manifest and manifest[key] != expected[key]:
            raise ArtifactError(
                f"{manifest_path}: field {key!r} = {manifest[key]!r} disagrees with the model the configuration "
                f"builds ({expected[key]!r}); the manifest was edited or is inconsistent"
            )


def load(path: str | Path, device: str | torch.device = "cpu") -> FaCTModel:
    """Load the artifact at ``path`` (a directory, or ``"default"``) as an eval-mode model.

    The weights' sha256 is verified before they are parsed; the architecture is rebuilt
    from the manifest's configuration and the weights loaded with ``strict=True``. The
    manifest is attached as ``model.manifest``.

    Raises:
        ArtifactError: anything wrong with the artifact (missing files, invalid JSON,
            wrong format or version, checksum mismatch, unknown architecture, weights
            that do not fit the architecture, inconsistent summary fields).
    """
    directory = resolve_artifact_path(path)
    manifest = read_manifest(directory)
    manifest_path = directory / MANIFEST_FILE
    state = _read_verified_weights(directory, manifest)

    try:
        config = FaCTConfig.from_dict(manifest["model"])
        model = FaCTModel(config)
    except (ValueError, TypeError) as err:
        raise ArtifactError(f"{manifest_path}: cannot build the model it describes: {err}") from err
    _check_summary(manifest, model, manifest_path)

    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ArtifactError(
            f"weights file {directory / manifest['weights']['file']} does not match architecture "
            f"{config.backbone!r}: missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}"
        )
    # Keep the saved floating-point precision (e.g. a float64 model round-trips exactly).
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        model = model.to(float_dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"weights file {directory / manifest['weights']['file']} does not fit architecture "
            f"{config.backbone!r}: {err}"
        ) from err

    model = model.to(device).eval()
    model.manifest = manifest
    return model
