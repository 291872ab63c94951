"""Run an exported FaCT model with ONNX Runtime (CUDA/TensorRT when really available, else CPU).

:class:`OnnxPredictor` verifies the ONNX file against the sha256 in the artifact's
manifest before opening a session, picks execution providers from what the machine has
(``onnxruntime-gpu`` installed on a CPU-only machine gives a quiet CPU session) and
returns the same quantities as :class:`~fact_model.onnx_export.PredictionGraph`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from fact_model.artifacts import ArtifactError, read_manifest, read_recorded_file, resolve_artifact_path
from fact_model.explanation import rank_classes
from fact_model.onnx_export import ONNX_OUTPUTS

__all__ = ["OnnxPredictor", "choose_providers"]

log = logging.getLogger(__name__)


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device`` (``auto``, ``cpu`` or ``cuda``) that can really run here."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda_present = torch.cuda.is_available()
    providers = []
    if device in ("auto", "cuda") and cuda_present:
        providers += [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    if device == "cuda" and not providers:
        raise ValueError("device 'cuda' requested but no CUDA device or CUDA execution provider is available")
    return [*providers, "CPUExecutionProvider"]


class OnnxPredictor:
    """An ONNX Runtime session for an artifact exported with :func:`~fact_model.onnx_export.export_onnx`.

    Raises:
        ArtifactError: no ONNX export recorded in the manifest, the file is missing, its
            sha256 differs from the manifest's (modified, corrupted or from another model),
            or it lacks outputs of the current export (made by an older version).
    """

    def __init__(self, artifact: str | Path, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        directory = resolve_artifact_path(artifact)
        manifest = read_manifest(directory)
        entry = manifest.get("onnx")
        if not isinstance(entry, dict):
            raise ArtifactError(f"{directory} has no ONNX export: run `fact export-onnx --model {directory}`")
        missing = [name for name in ONNX_OUTPUTS if name not in entry.get("outputs", ())]
        if missing:
            raise ArtifactError(
                f"the ONNX export of {directory} lacks the outputs {missing} (an older export): "
                f"re-export it with `fact export-onnx --model {directory}`"
            )
        data = read_recorded_file(
            directory,
            entry,
            "ONNX file",
            "it was modified, corrupted or belongs to another model; re-export it with `fact export-onnx`",
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no provider warnings on CPU-only machines
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = choose_providers(device)
        self.session = ort.InferenceSession(data, sess_options=options, providers=self.providers)
        self.entry = entry
        self.manifest = manifest

    def run(self, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """``(N, 3, H, W)`` float images in [0, 1] → the named outputs as numpy arrays.

        Besides the graph's outputs (:data:`~fact_model.onnx_export.ONNX_OUTPUTS`), ``ranking``
        ``(N, classes)`` int64: :func:`~fact_model.explanation.rank_classes` of the graph's
        ``scores``, whose first column is the graph's ``predicted``.
        """
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        outputs = self.session.run(None, {"images": np.ascontiguousarray(array, dtype=np.float32)})
        named = dict(zip(self.entry["outputs"], outputs, strict=True))
        named["ranking"] = rank_classes(torch.from_numpy(named["scores"])).numpy()
        return named
