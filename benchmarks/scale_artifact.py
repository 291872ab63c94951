"""Random-weight FaCT artifacts for measuring the service at scale: ``python -m benchmarks.scale_artifact --out DIR``.

The default is the paper's ImageNet shape (FACT_SPEC §7): a B-cos-v2 ResNet-50 at 224 px with
one concept layer at ``layer4``, K = 16,384, k = 16, sigmoid outputs, 1,000 classes — about
93 M parameters, 371 MB on disk. The weights are random (nothing is downloaded), so the
explanations are meaningless, but every cost the service pays — weights in memory, forward
and backward passes, map rendering, response sizes — is that of the real model. Tests build
tiny ones with the same function (:func:`build_scale_artifact` with a small backbone).

Optionally, concept statistics are written next to the model (:func:`add_statistics`),
computed on random images but with a dataset description of your choice, so that concept
cards can be exercised with images that can or cannot be read on the serving machine.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fact_model.artifacts import save
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.model import FaCTModel

__all__ = ["add_statistics", "build_scale_artifact", "main"]

log = logging.getLogger(__name__)


def build_scale_artifact(
    out: str | Path,
    backbone: str = "bcos_v2_resnet50",
    layers: Sequence[tuple[str, int, int]] = (("layer4", 16384, 16),),
    input_size: int = 224,
    num_classes: int = 1000,
    output_activation: str = "sigmoid",
    backbone_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a random-weight FaCT model and save it as an artifact directory.

    Args:
        out: the artifact directory to write.
        backbone: a registered architecture (``fact_model.backbones.list_backbones()``).
        layers: ``(stage, K, k)`` per concept layer.
        input_size: side of the square model input, pixels.
        num_classes: classes, named ``class_0 …``.
        output_activation: ``"sigmoid"`` (B-cos-v2 ImageNet models) or ``"softmax"``.
        backbone_kwargs: extra architecture arguments (e.g. ``{"width": 8}`` for ``bcos_resnet8``).
        seed: seed of the random weights (the same seed gives the same artifact).
        overwrite: replace an existing directory.

    Returns:
        The artifact directory.
    """
    torch.manual_seed(seed)
    config = FaCTConfig(
        backbone=backbone,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        preprocessing=Preprocessing(input_size),
        concept_layers=tuple(ConceptLayerSpec(name, k_total, k) for name, k_total, k in layers),
        backbone_kwargs=dict(backbone_kwargs or {}),
        output_activation=output_activation,
    )
    model = FaCTModel(config).eval()
    provenance = {"note": "random weights, for measuring the service (service/scale_artifact.py)", "seed": seed}
    path = save(model, out, provenance=provenance, overwrite=overwrite)
    log.info("wrote %s (%d parameters)", path, sum(p.numel() for p in model.parameters()))
    return path


def add_statistics(
    artifact: str | Path, data: Mapping[str, Any] | None, images: int = 32, top: int = 8, seed: int = 0
) -> Path:
    """Compute concept statistics of ``artifact`` on random images and save them next to it.

    Args:
        artifact: an artifact directory (e.g. from :func:`build_scale_artifact`).
        data: the dataset description recorded with them (``concept_stats.json``'s ``data``), e.g.
            ``{"dataset": "image_folder", "root": "/not/here", "split": "val", …}``; None records none.
        images: random images to compute them on.
        top: top-activating images kept per concept.
        seed: seed of the random images and labels.

    Returns:
        The statistics file.
    """
    from fact_model.analysis.concept_stats import compute_concept_stats, save_concept_stats
    from fact_model.artifacts import load
    from fact_model.data.loading import ImageSplit

    model = load(artifact)
    size = model.config.preprocessing.input_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, model.num_classes, (images,), generator=generator)
    split = ImageSplit.from_tensors(pixels, labels, model.class_names, None if data is None else dict(data))
    stats = compute_concept_stats(model, split, top=top, progress=False)
    return save_concept_stats(artifact, stats, {"data": None if data is None else dict(data), "top": top})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    parser.add_argument("--backbone", default="bcos_v2_resnet50")
    parser.add_argument("--layer", action="append", help="STAGE:K:k, repeat for more layers (default: layer4:16384:16)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    layers = []
    for spec in args.layer or ["layer4:16384:16"]:
        stage, k_total, k = spec.split(":")
        layers.append((stage, int(k_total), int(k)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_scale_artifact(
        args.out,
        args.backbone,
        layers,
        args.input_size,
        args.classes,
        seed=args.seed,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
