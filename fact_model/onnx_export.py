"""Export a FaCT model's prediction and last-layer concept decomposition to ONNX (``fact export-onnx``).

The exported graph computes, for a batch ``images`` ``(N, 3, H, W)`` in [0, 1] (dynamic N):

* ``logits`` ``(N, classes)`` (bias included);
* ``top_ids`` / ``top_contributions`` ``(N, top_k)``: the last concept layer's concepts with
  the largest contributions to the predicted class's ``logit − b``, in closed form
  (spec section 4: ``s_{c,p} (Ŵ_head D)[c,k] / (P·T)``, no backward pass; a ViT's head has
  its own closed form, :func:`~fact_model.explain.closed_form_code_gradient`);
* ``concept_totals`` ``(N, K)``: each concept's total activation ``Σ_p u_{k,p}``;
* ``residual`` ``(N,)``: ``|Σ_k contribution − (logit − b)|`` of the predicted class;
* ``scores`` ``(N, classes)``: the bias-free scores ``logit − b`` the graph ranked;
  :func:`~fact_model.explanation.rank_classes` of them is the class ranking;
* ``predicted`` ``(N,)`` int64: the explained (predicted) class, ``rank_classes(scores)[:, 0]``.

It is a plain forward computation of the reference PyTorch layers (no Triton, no
Python callbacks), exported with the ``torch.onnx`` (dynamo) exporter and checked with
``onnx.checker``. The file goes next to the weights and the manifest records its sha256.
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
from torch import Tensor, nn

from fact_model.artifacts import MANIFEST_FILE, load, read_manifest, resolve_artifact_path
from fact_model.bcos.encoding import encode_rgb
from fact_model.explain import closed_form_applies, closed_form_contributions
from fact_model.model import FaCTModel

__all__ = ["ONNX_FILE", "ONNX_OUTPUTS", "PredictionGraph", "export_onnx"]

ONNX_FILE = "model.onnx"
ONNX_OUTPUTS = ("logits", "top_ids", "top_contributions", "concept_totals", "residual", "scores", "predicted")


class PredictionGraph(nn.Module):
    """The exported computation (see the module docstring); also usable as a PyTorch reference."""

    def __init__(self, model: FaCTModel, top_k: int) -> None:
        super().__init__()
        if not closed_form_applies(model):
            raise ValueError(
                "ONNX export needs the closed-form decomposition: the last concept layer must feed the "
                f"head directly (put a concept layer at the last stage, {model.backbone.stage_names[-1]!r}) "
                "and the head must have a closed form (a 1×1 B-cos conv, or a ViT's pooled norm + B-cos "
                "linear, without MaxOut)"
            )
        self.model = model
        self.layer = model.concept_layers[-1].name
        self.top_k = min(top_k, model.concept_layers[-1].num_concepts)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """``(N, 3, H, W)`` images in [0, 1] → the outputs named by :data:`ONNX_OUTPUTS`, in that order."""
        record = self.model.forward_encoded(encode_rgb(images))
        # = rank_classes(scores)[:, 0]: argmax (torch and ONNX ArgMax) returns the first of
        # equal maxima, the stable descending sort's tie rule, without sorting every class.
        predicted = record.scores.argmax(dim=1)
        contributions = closed_form_contributions(self.model, record, predicted)
        top = contributions.topk(self.top_k, dim=1)
        explained = record.scores.gather(1, predicted[:, None]).squeeze(1)
        residual = (contributions.sum(dim=1) - explained).abs()
        totals = record.codes[self.layer].totals()
        return record.logits, top.indices, top.values, totals, residual, record.scores, predicted


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inside_package(directory: Path) -> bool:
    import fact_model

    package = Path(fact_model.__file__).resolve().parent
    return directory.resolve().is_relative_to(package)


def _copy_artifact(source: Path, out: Path) -> Path:
    """Copy the artifact ``source`` to the new directory ``out`` (atomically: a sibling temp, then a rename)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty directory: choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    shutil.copytree(source, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ONNX_FILE, ".*"))
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return out


def export_onnx(artifact: str | Path, top_k: int = 5, out: str | Path | None = None) -> dict[str, Any]:
    """Export the artifact's model to ONNX and record it in the manifest.

    Without ``out`` the graph is written into the artifact (``<artifact>/model.onnx``); with
    ``out`` the artifact is first copied to that new directory and the export goes there, so
    the source stays untouched. The model shipped inside the installed package is never
    written to: exporting it needs ``out``.

    Returns the manifest's ``onnx`` entry (file, sha256, opset, top_k, inputs, outputs).

    Raises:
        ValueError: the model has no closed-form last concept layer, the exported graph
            fails ``onnx.checker``, the artifact lies inside the installed package and no
            ``out`` was given, or ``out`` is not a new (or empty) directory.
    """
    import onnx

    directory = resolve_artifact_path(artifact)
    if out is not None:
        model = load(directory).eval()  # refuse a broken artifact before copying it
        directory = _copy_artifact(directory, Path(out))
    elif _inside_package(directory):
        raise ValueError(
            f"{directory} is inside the installed fact_model package, which is never written to: "
            "pass --out DIR to export a copy of the model with its ONNX graph there"
        )
    model = load(directory).eval()
    graph = PredictionGraph(model, top_k).eval()
    size = model.config.preprocessing.input_size
    example = torch.rand(2, 3, size, size)
    tmp = directory / f".{ONNX_FILE}.tmp"
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(tmp),
            dynamo=True,
            input_names=["images"],
            output_names=list(ONNX_OUTPUTS),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            external_data=False,  # one self-contained file (the models are small), hashed as a whole
            verbose=False,
        )
    proto = onnx.load(str(tmp))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"the exported ONNX graph is invalid: {err}") from err
    os.replace(tmp, directory / ONNX_FILE)
    entry = {
        "file": ONNX_FILE,
        "sha256": _sha256(directory / ONNX_FILE),
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "top_k": graph.top_k,
        "layer": graph.layer,
        "inputs": {"images": ["N", 3, size, size]},
        "outputs": list(ONNX_OUTPUTS),
        "exporter": f"torch.onnx (dynamo), torch {torch.__version__}",
    }
    manifest = read_manifest(directory)
    manifest["onnx"] = entry
    fd, tmp_manifest = tempfile.mkstemp(dir=directory, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp_manifest, directory / MANIFEST_FILE)
    return entry
