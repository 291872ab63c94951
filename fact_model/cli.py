"""The ``fact`` command line: train, evaluate, explain, export data.

    fact train backbone   train a B-cos backbone from scratch
    fact train concepts   add and train concept layers (on a trained backbone or a B-cos-v2 checkpoint)
    fact evaluate         accuracy and concept figures (JSON + Markdown report)
    fact stats            per-concept dataset statistics, saved next to the model
    fact quality          C²-score and ground-truth recovery: concepts vs raw channels vs random
    fact report           HTML report: evaluation, concept quality, galleries, example decisions
    fact faithfulness     FaCT vs Integrated Gradients, Grad-CAM, occlusion…: faithfulness, localisation, cost
    fact explain IMAGE…   explain images locally (table, JSON, PNG maps)
    fact export-onnx      ONNX graph of the prediction and last-layer concept decomposition
    fact data export      write embedded-dataset images as PNG folders
    fact data digits      write scikit-learn's real handwritten digits as an ImageNet-layout folder

The CLI only parses arguments into configs; the work is in :mod:`fact_model.training`,
:mod:`fact_model.analysis` and :mod:`fact_model.explain`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fact_model._memory import pin_large_allocations_to_mmap

__all__ = ["main"]

log = logging.getLogger("fact")


# ----------------------------------------------------------------------------- arguments
def _add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (embedded dataset) or an image folder: ROOT/<class>/… or ROOT/{train,val}/<class>/…",
    )
    group.add_argument(
        "--val-data", default=None, help="folder: a separate validation folder (one sub-folder per class)"
    )
    group.add_argument(
        "--workers", type=int, default=None, help="folder: image-decoding worker processes (default: spare cores)"
    )
    group.add_argument(
        "--image-size", type=int, default=None, help="model input size in pixels (default: the model's, else 48)"
    )
    group.add_argument("--data-seed", type=int, default=None, help="synthetic generation / folder split seed (0)")
    group.add_argument("--train-size", type=int, default=None, help="synthetic train split size (6000)")
    group.add_argument("--val-size", type=int, default=None, help="synthetic val split size (1000)")
    group.add_argument("--test-size", type=int, default=None, help="synthetic test split size (1000)")
    group.add_argument(
        "--val-fraction", type=float, default=None, help="folder without val/: share of each class for validation (0.1)"
    )
    group.add_argument("--resize", type=int, default=None, help="folder: shorter side before centre crop")


def _data_spec(args: argparse.Namespace, preprocessing=None):
    """The data of a command; without ``--image-size``, at ``preprocessing`` (the model's or a preset's) if given."""
    from fact_model.data.sources import DataSpec

    resize, image_size = args.resize, args.image_size
    if image_size is None and preprocessing is not None:
        image_size = preprocessing.input_size
        resize = preprocessing.resize if resize is None else resize
    given = {
        "image_size": image_size,
        "seed": args.data_seed,
        "train": args.train_size,
        "val": args.val_size,
        "test": args.test_size,
        "val_fraction": args.val_fraction,
    }
    return DataSpec(
        source=args.data,
        **{name: value for name, value in given.items() if value is not None},  # else DataSpec's defaults
        resize=resize,
        val_source=args.val_data,
        workers=_workers(args.workers),
    )


def _workers(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ValueError(f"--workers must be ≥ 0, got {value}")
    return value


_EVAL_BATCH_HELP = "images per explanation pass (default: about 110,000 input pixels per batch, 8–256 images)"


def _eval_batch_size(args: argparse.Namespace, size: int) -> int:
    """``--batch-size``, or a size that keeps one batch's activations about as large as 48 images of 48²."""
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
        return args.batch_size
    return max(8, min(256, (48 * 48 * 48) // (size * size)))


def _layer_spec(text: str):
    from fact_model.config import ConceptLayerSpec

    try:
        name, num_concepts, k = text.rsplit(":", 2)
        return ConceptLayerSpec(name, int(num_concepts), int(k))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LAYER:K:k such as layer3:256:8, got {text!r} ({err})") from err


def _add_training_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available; under torchrun the rank's GPU cuda:LOCAL_RANK, NCCL), cpu (gloo under "
        "torchrun), or a device such as cuda:1 for a single process",
    )


def _training_session(args: argparse.Namespace):
    """``(session, device)``: the torchrun process group (or a single process) and where a single process trains."""
    import torch

    if args.device == "auto":
        single = "cuda" if torch.cuda.is_available() else "cpu"
        return _torchrun_session(), single
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asks for CUDA, which this machine does not have (try --device cpu)")
    return _torchrun_session(device="cpu" if device.type == "cpu" else None), device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fact", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a backbone or concept layers").add_subparsers(
        dest="what", required=True
    )
    backbone = train.add_parser("backbone", help="train a B-cos backbone from scratch")
    _add_data_args(backbone)
    backbone.add_argument("--arch", default="bcos_resnet14", help="registered architecture")
    backbone.add_argument("--width", type=int, default=16, help="small ResNets: first-stage channels")
    backbone.add_argument("--epochs", type=int, default=12)
    backbone.add_argument("--batch-size", type=int, default=64)
    backbone.add_argument("--lr", type=float, default=2e-3)
    backbone.add_argument("--seed", type=int, default=0)
    backbone.add_argument(
        "--clip-grad-norm", type=float, default=None, help="clip the gradient's L2 norm to this value (default: off)"
    )
    backbone.add_argument("--amp", action="store_true", help="bf16 autocast of the forward pass (CUDA only)")
    _add_training_device(backbone)
    backbone.add_argument("--out", type=Path, required=True, help="run directory (checkpoint/, model/)")

    concepts = train.add_parser("concepts", help="add and train concept layers (backbone frozen)")
    _add_data_args(concepts)
    source = concepts.add_mutually_exclusive_group()
    source.add_argument("--model", help="a trained model artifact directory (e.g. RUN/model)")
    source.add_argument("--bcos-v2-checkpoint", type=Path, help="a local B-cos-v2 .pth/.safetensors checkpoint")
    concepts.add_argument("--arch", help="architecture of --bcos-v2-checkpoint, e.g. bcos_v2_resnet50")
    concepts.add_argument(
        "--layer", type=_layer_spec, action="append", default=None, help="LAYER:K:k, repeatable (e.g. layer3:256:8)"
    )
    concepts.add_argument(
        "--preset", default=None, help="a configuration of the paper, e.g. resnet50_long/layer4 (see --list-presets): "
        "architecture, layer, K/k, preprocessing and the SAE recipe; explicit flags override it",
    )  # fmt: skip
    concepts.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    concepts.add_argument("--epochs", type=int, default=None, help="SAE epochs (default 10; presets: 16)")
    concepts.add_argument("--batch-size", type=int, default=None, help="feature vectors per SAE step (default 1024)")
    concepts.add_argument("--lr", type=float, default=None, help="SAE learning rate (default 1e-3)")
    concepts.add_argument("--aux-k", type=int, default=None, help="auxiliary latents reviving dead concepts (64)")
    concepts.add_argument("--positions", type=int, default=None, help="feature vectors sampled per image (16)")
    concepts.add_argument(
        "--feature-dtype", choices=["float32", "float16"], default="float32", help="feature shards on disk"
    )
    concepts.add_argument(
        "--shard-mib", type=float, default=64.0, help="feature shard size on disk, MiB (the SAE buffers 4 shards)"
    )
    concepts.add_argument("--seed", type=int, default=0)
    _add_training_device(concepts)
    concepts.add_argument("--out", type=Path, default=None, help="run directory (features/, checkpoints, model/)")

    evaluate = commands.add_parser("evaluate", help="accuracy and concept figures of a model")
    _add_data_args(evaluate)
    evaluate.add_argument("--model", default="default", help="artifact directory or 'default'")
    evaluate.add_argument(
        "--split", default=None, help="synthetic: train/val/test (default test); folder: all (default), train, val; "
        "ROOT/{train,val,test}: test if present, else val",
    )  # fmt: skip
    evaluate.add_argument("--batch-size", type=int, default=None, help=_EVAL_BATCH_HELP)
    evaluate.add_argument("--out", type=Path, required=True, help="where evaluation.json/.md go")

    stats = commands.add_parser("stats", help="per-concept dataset statistics, saved next to the model")
    _add_data_args(stats)
    stats.add_argument("--model", required=True, help="artifact directory (the statistics are written into it)")
    stats.add_argument("--split", default=None, help="as for fact evaluate")
    stats.add_argument("--top", type=int, default=16, help="top-activating images kept per concept")
    stats.add_argument("--batch-size", type=int, default=None, help=_EVAL_BATCH_HELP)

    quality = commands.add_parser("quality", help="C²-score and ground-truth recovery of concepts vs channels")
    _add_data_args(quality)
    quality.add_argument("--model", default="default", help="artifact directory or 'default'")
    quality.add_argument("--split", default="test", help="evaluation split (synthetic)")
    quality.add_argument("--layer", action="append", default=None, help="concept layer (repeatable; default: all)")
    quality.add_argument(
        "--dinov2-weights",
        default=None,
        help="local DINOv2 ViT-S/14 weights (else $FACT_DINOV2_WEIGHTS, else built-in)",
    )
    quality.add_argument("--out", type=Path, required=True, help="where quality.json/.md go")

    report = commands.add_parser("report", help="HTML report: evaluation, concept quality, galleries, examples")
    _add_data_args(report)
    report.add_argument("--model", default="default", help="artifact directory or 'default'")
    report.add_argument("--split", default="test", help="evaluation split (synthetic)")
    report.add_argument("--dinov2-weights", default=None, help="local DINOv2 ViT-S/14 weights (else built-in)")
    report.add_argument("--out", type=Path, required=True, help="directory for report.html and its PNGs")

    faithfulness = commands.add_parser(
        "faithfulness", help="FaCT vs Captum's attribution methods on the same model: faithfulness, localisation, cost"
    )
    _add_data_args(faithfulness)
    faithfulness.add_argument("--model", default="default", help="artifact directory or 'default'")
    faithfulness.add_argument("--split", default=None, help="split (default: synthetic test, a folder's val/all)")
    faithfulness.add_argument("--n", type=int, default=200, help="images (the first n of the split)")
    faithfulness.add_argument("--methods", default=",".join(FAITHFULNESS_METHODS), help="comma-separated methods")
    faithfulness.add_argument("--steps", type=int, default=16, help="pixel-flipping steps of the curves")
    faithfulness.add_argument("--timing-repeats", type=int, default=3, help="timed calls per method and batch size")
    faithfulness.add_argument("--out", type=Path, required=True, help="where faithfulness.json/.md/_curves.png go")

    onnx_export = commands.add_parser("export-onnx", help="export prediction + concept decomposition to ONNX")
    onnx_export.add_argument("--model", required=True, help="artifact directory or 'default'")
    onnx_export.add_argument(
        "--out", type=Path, default=None,
        help="new directory: a copy of the model with model.onnx (required for the shipped default model; "
        "without it model.onnx is written into the --model directory)",
    )  # fmt: skip
    onnx_export.add_argument("--top-k", type=int, default=5, help="top concepts returned per image")

    explain = commands.add_parser("explain", help="explain image files with a model, locally")
    explain.add_argument("images", nargs="+", type=Path, help="image files (any size and mode)")
    explain.add_argument("--model", default="default", help="artifact directory or 'default'")
    explain.add_argument("--target", default=None, help="class index or name (default: predicted)")
    explain.add_argument("--contrast", default=None, help="class to contrast with")
    explain.add_argument("--top-k", type=int, default=5)
    explain.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    explain.add_argument("--out", type=Path, default=None, help="write PNG maps here")

    data = commands.add_parser("data", help="dataset utilities (embedded dataset, real digits)").add_subparsers(
        dest="what", required=True
    )
    export = data.add_parser("export", help="write embedded-dataset images as PNGs, one folder per class")
    _add_data_args(export)
    export.add_argument("--split", default="test", choices=["train", "val", "test"])
    export.add_argument("--n", type=int, default=None, help="first N images of the split (default: all)")
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--overwrite", action="store_true")
    digits = data.add_parser(
        "digits", help="write scikit-learn's 1,797 real handwritten digits as ROOT/{train,test}/<digit>/*.png"
    )
    digits.add_argument("--out", type=Path, required=True)
    digits.add_argument("--size", type=int, default=32, help="side of the upsampled images in pixels")
    digits.add_argument("--test-fraction", type=float, default=0.25, help="share of each digit in test/")
    digits.add_argument("--per-split", type=int, default=None, help="first N images of each split (default: all)")
    digits.add_argument("--overwrite", action="store_true")
    return parser


# ----------------------------------------------------------------------------- commands
def _train_backbone(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.data.sources import open_training_data
    from fact_model.training.backbone import BackboneTrainConfig, train_backbone

    arch_kwargs = {"width": args.width} if args.arch.startswith("bcos_resnet") else {}
    config = BackboneTrainConfig(
        arch=args.arch,
        arch_kwargs=arch_kwargs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        clip_grad_norm=args.clip_grad_norm,
        amp=args.amp,
    )
    data = open_training_data(_data_spec(args))
    session, device = _training_session(args)
    with session as ctx:  # one process, or a rank of a torchrun launch (DistributedDataParallel)
        train_backbone(config, data, args.out, progress=progress, context=ctx, device=device)


def _start_model(args: argparse.Namespace, data, arch: str | None, output_activation: str = "sigmoid", trained=None):
    """``trained`` (the ``--model`` artifact, loaded), checked against the data; else the B-cos-v2 checkpoint."""
    from fact_model.backbones import load_bcos_v2_checkpoint
    from fact_model.config import FaCTConfig
    from fact_model.model import FaCTModel

    if trained is not None:
        model = trained
        from fact_model._validation import check_same_classes

        check_same_classes(data.class_names, model.class_names)
        if arch is not None and model.config.backbone != arch:
            raise ValueError(f"the model's backbone is {model.config.backbone!r}, the preset's {arch!r}")
        return model
    if not arch:
        raise ValueError("--bcos-v2-checkpoint needs --arch (e.g. bcos_v2_resnet50, bcos_v2_densenet121) or --preset")
    config = FaCTConfig(
        backbone=arch,
        class_names=data.class_names,
        preprocessing=data.preprocessing,
        output_activation=output_activation,
    )
    model = FaCTModel(config)
    load_bcos_v2_checkpoint(model.backbone, args.bcos_v2_checkpoint)
    return model.eval()


def _list_presets() -> None:
    from fact_model.presets import presets_table

    table = Table(title="concept-layer presets (FaCT spec section 7)")
    for column in ("preset", "architecture", "layer", "K / k", "resize→crop", "output", "paper"):
        table.add_column(column, no_wrap=column in ("preset", "architecture", "layer"))
    for row in presets_table():
        table.add_row(*row)
    Console(width=max(Console().width, 150)).print(table)


def _train_concepts(args: argparse.Namespace, progress: bool) -> None:

    from fact_model.data.sources import open_training_data
    from fact_model.presets import get_preset
    from fact_model.training.concepts import ConceptTrainConfig, train_concepts

    if args.list_presets:
        _list_presets()
        return
    preset = get_preset(args.preset) if args.preset else None
    if not (args.model or args.bcos_v2_checkpoint):
        raise ValueError("fact train concepts needs --model ARTIFACT or --bcos-v2-checkpoint FILE")
    if args.out is None:
        raise ValueError("fact train concepts needs --out RUN_DIRECTORY")
    layers = list(args.layer or ([preset.layer] if preset else []))
    if not layers:
        raise ValueError("give --layer LAYER:K:k (repeatable) or --preset NAME (see --list-presets)")
    if preset and args.arch and args.arch != preset.arch:
        raise ValueError(f"--arch {args.arch} contradicts --preset {preset.name} (architecture {preset.arch})")
    recipe = dict(preset.training) if preset else {}
    explicit = {
        "positions_per_image": args.positions,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "aux_k": args.aux_k,
    }
    recipe.update({k: v for k, v in explicit.items() if v is not None})
    config = ConceptTrainConfig(**recipe, feature_dtype=args.feature_dtype, seed=args.seed)
    if args.model:  # a trained artifact: its own preprocessing unless --image-size says otherwise
        from fact_model.artifacts import load

        trained = load(args.model)
        preprocessing = trained.config.preprocessing
    else:
        trained = None
        preprocessing = preset.preprocessing if preset is not None else None
    data = open_training_data(_data_spec(args, preprocessing))
    arch = args.arch or (preset.arch if preset else None)
    model = _start_model(args, data, arch, preset.output_activation if preset else "sigmoid", trained)
    if not args.shard_mib > 0:
        raise ValueError(f"--shard-mib must be > 0, got {args.shard_mib}")
    session, device = _training_session(args)
    with session as ctx:  # one process, or a rank of a torchrun launch (sharded collection, data-parallel SAE)
        train_concepts(
            model, data, layers, config, args.out, progress, context=ctx, device=device,
            shard_bytes=max(1, int(args.shard_mib * 2**20)),
        )  # fmt: skip


def _eval_split(args: argparse.Namespace, model=None):
    """The split a data-reading command works on (default: synthetic ``test``, a folder's ``val`` or ``all``)."""
    from fact_model.data.sources import open_split

    spec = _data_spec(args, model.config.preprocessing if model is not None else None)
    if args.split:
        split = args.split
    elif spec.is_synthetic:
        split = "test"
    elif spec.layout() == "classes":
        split = "all"  # a folder of its own (e.g. a test set), or the whole training folder
    else:
        split = "test" if "test" in spec.splits() else "val"
    data = open_split(spec, split)
    if model is not None:
        from fact_model._validation import check_same_classes

        check_same_classes(
            data.class_names,
            model.class_names,
            "(same class folders, in the same sorted order, as the model was trained on)",
        )
    return data


def _torchrun_session(device: str | None = None):
    """The process group of a ``torchrun`` launch, or a single process (:func:`fact_model.distributed.session`)."""
    from fact_model import distributed
    from fact_model.options import torchrun_environment

    return distributed.session(torchrun_environment(), device=device)


def _evaluate(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.analysis.evaluate import evaluate
    from fact_model.artifacts import load
    from fact_model.training.common import print_summary

    with _torchrun_session() as ctx:  # one process, or a rank of a torchrun launch
        model = load(args.model, device=ctx.device)
        split = _eval_split(args, model)
        batch_size = _eval_batch_size(args, split.image_size)
        report = evaluate(model, split, batch_size=batch_size, progress=progress, context=ctx)
    if not ctx.is_main:
        return  # every rank holds the whole report; rank 0 writes it
    json_path, md_path = report.save(args.out)
    rows: dict[str, object] = {"backbone accuracy": report.backbone_accuracy, "FaCT accuracy": report.fact_accuracy}
    for f in report.layers:
        rows[f"{f.layer}: image-L0"] = f.image_l0_mean
        rows[f"{f.layer}: concepts for 80 %"] = f.concepts_for_80_percent_mean
        rows[f"{f.layer}: alive"] = f.alive_fraction
        rows[f"{f.layer}: always active"] = f.always_active
        rows[f"{f.layer}: recon. NMSE"] = f.reconstruction_nmse
        rows[f"{f.layer}: max residual"] = f.max_residual
        rows[f"{f.layer}: shared concepts"] = f"{f.shared_concepts} of {f.concepts_supporting_a_class}"
    rows["report"] = f"{json_path}, {md_path}"
    if ctx.world_size > 1:
        rows["processes"] = ctx.world_size
    print_summary("evaluation", rows)


def _stats(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.analysis.concept_stats import compute_concept_stats, save_concept_stats
    from fact_model.artifacts import load, resolve_artifact_path
    from fact_model.training.common import print_summary

    with _torchrun_session() as ctx:  # one process, or a rank of a torchrun launch
        model = load(args.model, device=ctx.device)
        split = _eval_split(args, model)
        batch_size = _eval_batch_size(args, split.image_size)
        stats = compute_concept_stats(model, split, top=args.top, batch_size=batch_size, progress=progress, context=ctx)
    if not ctx.is_main:
        return  # every rank holds the whole statistics (and every rank's skipped items); rank 0 writes them
    meta = {"data": split.description, "top": args.top, "skipped": len(split.skipped)}
    path = save_concept_stats(resolve_artifact_path(args.model), stats, meta)
    rows = {"images": len(split) - len(split.skipped), "layers": len(model.concept_layers), "file": str(path)}
    if ctx.world_size > 1:
        rows["processes"] = ctx.world_size
    print_summary("concept statistics", rows)


@dataclass
class _GroundTruth:
    """What ``fact quality`` and ``fact report`` read: the embedded split in memory with its part maps."""

    model: Any
    split: Any
    images: Any  # (N, 3, H, W) in [0, 1]
    labels: Any  # (N,)
    part_maps: Any  # (N, H, W) part id per pixel (0 = background)
    encoders: list  # the part-map oracle, then the reference encoder (DINOv2 or the built-in fallback)
    class_parts: list[int]  # part ids that belong to some class (distractors excluded)


def _ground_truth(args: argparse.Namespace, command: str) -> _GroundTruth:
    from fact_model.analysis.encoders import OracleEncoder, reference_encoder
    from fact_model.artifacts import load
    from fact_model.data.sources import open_split
    from fact_model.data.synthetic import CLASS_PARTS, PART_NAMES

    model = load(args.model)
    spec = _data_spec(args, model.config.preprocessing)
    if not spec.is_synthetic:
        raise ValueError(f"fact {command} needs ground-truth part maps: use --data synthetic")
    split = open_split(spec, args.split)
    images, labels = split.materialise()  # generated data: in memory, with its ground-truth part maps
    part_maps = split.part_maps()
    encoder, message = reference_encoder(args.dinov2_weights)
    if message:
        log.warning("%s", message)
    encoders = [OracleEncoder(part_maps, len(PART_NAMES)), encoder]
    class_parts = sorted({p + 1 for parts in CLASS_PARTS for p in parts})
    return _GroundTruth(model, split, images, labels, part_maps, encoders, class_parts)


def _quality(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.analysis.quality import concept_quality, quality_markdown
    from fact_model.data.synthetic import PART_NAMES
    from fact_model.training.common import print_summary

    # the quality pass runs on the CPU (as in one process), so its ranks talk over gloo
    with _torchrun_session(device="cpu") as ctx:
        truth = _ground_truth(args, "quality")
        model, images, part_maps = truth.model, truth.images, truth.part_maps
        layers = args.layer or [info.name for info in model.concept_layers]
        reports = []
        for layer in layers:
            for source in ("fact", "channels"):
                reports.append(
                    concept_quality(
                        model,
                        images,
                        layer,
                        truth.encoders,
                        source,
                        part_maps,
                        PART_NAMES,
                        truth.class_parts,
                        progress=progress,
                        context=ctx,
                    )
                )
    if not ctx.is_main:
        return  # every rank holds the whole reports; rank 0 writes them
    args.out.mkdir(parents=True, exist_ok=True)
    texts = {"quality.json": json.dumps([r.to_dict() for r in reports], indent=2) + "\n"}
    texts["quality.md"] = quality_markdown(reports)
    for name, text in texts.items():
        tmp = args.out / f".{name}.tmp"  # a reader never sees half a file
        tmp.write_text(text)
        tmp.replace(args.out / name)
    rows: dict[str, object] = {}
    for r in reports:
        for key, value in r.summary().items():
            if key not in ("layer", "source"):
                rows[f"{r.layer} {r.source}: {key}"] = value
    print_summary("concept quality", rows)


def _report(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.analysis.concept_stats import STATS_META, load_concept_stats
    from fact_model.analysis.evaluate import evaluate
    from fact_model.analysis.report import write_report
    from fact_model.artifacts import resolve_artifact_path
    from fact_model.data.sources import open_recorded_split
    from fact_model.data.synthetic import PART_NAMES
    from fact_model.training.common import print_summary

    truth = _ground_truth(args, "report")
    model, split = truth.model, truth.split
    directory = resolve_artifact_path(args.model)
    stats, stats_images = None, None
    if (directory / STATS_META).is_file():
        stats, meta = load_concept_stats(directory)
        try:
            stats_images = open_recorded_split(meta.get("data") or {}).images  # the statistics' images by index
        except ValueError as err:
            log.warning("concept galleries are skipped: %s", err)
    evaluation_path = directory / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.is_file() else None
    if evaluation is None or evaluation.get("data") != split.description:
        evaluation = json.loads(evaluate(model, split, progress=progress).to_json())
    path = write_report(
        model,
        truth.images,
        truth.labels,
        truth.part_maps,
        PART_NAMES,
        truth.class_parts,
        truth.encoders,
        args.out,
        stats=stats,
        stats_images=stats_images,
        evaluation=evaluation,
        data_description=split.description,
        progress=progress,
    )
    print_summary("report", {"html": str(path), "files": len(list(args.out.iterdir()))})


def _faithfulness(args: argparse.Namespace, progress: bool) -> None:
    import torch

    from fact_model.analysis.faithfulness import run_faithfulness, write_faithfulness
    from fact_model.artifacts import load
    from fact_model.data.synthetic import CLASS_PARTS
    from fact_model.training.common import print_summary

    if args.n < 4:
        raise ValueError(f"--n must be ≥ 4 (the grid pointing game needs mosaics of four images), got {args.n}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]  # run_faithfulness refuses unknown ones
    model = load(args.model)
    split = _eval_split(args, model)
    images, labels, positions = [], [], []
    for batch in split.batches(min(args.n, 64), progress=False):
        images.append(batch.float_images())
        labels.append(batch.labels)
        positions.append(batch.indices)
        if sum(len(x) for x in labels) >= args.n:
            break
    images_t, labels_t = torch.cat(images)[: args.n], torch.cat(labels)[: args.n]
    part_maps = class_parts = None
    if split.description.get("dataset") == "synthetic":
        part_maps = split.part_maps()[torch.cat(positions)[: args.n]].long()
        class_parts = [[p + 1 for p in parts] for parts in CLASS_PARTS]  # part id = index + 1 (0: background)
    report = run_faithfulness(
        model, images_t, labels_t, part_maps, class_parts, methods, steps=args.steps,
        timing_repeats=args.timing_repeats, progress=progress,
    )  # fmt: skip
    paths = write_faithfulness(report, args.out)
    rows = {f"{m}: {k}": v for m, row in report.methods.items() for k, v in row.items() if k in SUMMARY_KEYS}
    print_summary("faithfulness", {**rows, **{name: str(path) for name, path in paths.items()}})


FAITHFULNESS_METHODS = ("fact", "ig15", "ig50", "input_x_gradient", "grad_cam", "occlusion", "random")
"""The methods of ``fact faithfulness`` (:data:`fact_model.analysis.faithfulness.METHODS`; here without torch)."""
SUMMARY_KEYS = ("completeness_error", "deletion_morf_auc", "insertion_auc", "ms_per_image_b1")


def _export_onnx(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.onnx_export import export_onnx
    from fact_model.training.common import print_summary

    entry = export_onnx(args.model, top_k=args.top_k, out=args.out)
    print_summary("ONNX export", {k: str(v) for k, v in entry.items()})


def _explain(args: argparse.Namespace, progress: bool) -> None:
    from fact_model import render
    from fact_model.artifacts import load
    from fact_model.image_io import read_rgb

    model = load(args.model)
    # read_rgb: the accepted formats, integrity checks and mode conversion of the service and datasets;
    # its ValueError names the file
    pil_images = [read_rgb(path) for path in args.images]
    target, contrast = _class_argument(args.target), _class_argument(args.contrast)
    batch = model.preprocess(pil_images)
    expl = model.explain(batch, target=target, contrast=contrast, top_k=args.top_k, maps=args.out is not None)
    from fact_model.serialize import explanation_record

    records = [
        {"image": str(path), **explanation_record(expl, n, model.class_names)} for n, path in enumerate(args.images)
    ]
    if args.json:
        for record in records:
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        console = Console()
        for record in records:
            _print_record(console, record)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        maps = expl.maps
        top_layer = expl.layer_names[-1]
        for n, path in enumerate(args.images):
            stem = path.stem
            logit_rgba = render.bcos_colour(maps.logit[n], maps.inputs[n])
            (args.out / f"{stem}_logit.png").write_bytes(render.to_png(logit_rgba, size=4 * batch.shape[-1]))
            for rank, concept in enumerate(expl.top_ids[top_layer][n].tolist()):
                rgba = render.bcos_colour(maps.concepts[top_layer][n, rank], maps.inputs[n])
                name = f"{stem}_{top_layer}_concept{concept}.png"
                (args.out / name).write_bytes(render.to_png(rgba, size=4 * batch.shape[-1]))
        log.info("maps written to %s", args.out)


def _class_argument(value: str | None) -> int | str | None:
    """``--target``/``--contrast``: a string of ASCII digits is a class index, anything else a class name."""
    if value is not None and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return int(value)
    return value


def _print_record(console: Console, record: dict) -> None:
    p = record["prediction"]
    title = (
        f"{record['image']}: predicted {p['name']!r} (p = {p['probability']:.3f}); "
        f"explaining {record['target']['name']!r}"
    )
    table = Table(title=title)
    for column in ("layer", "concept", "contribution", "share", "built from (lower layer)"):
        table.add_column(column)
    for c in record["concepts"]:
        children = ", ".join(f"{ch['id']} ({ch['contribution_to_parent']:+.3g})" for ch in c["children"])
        table.add_row(c["layer"], str(c["id"]), f"{c['contribution']:+.4g}", f"{c['share']:.1%}", children)
    console.print(table)
    console.print(
        f"  other concepts {record['other']['contribution']:+.4g}; explained {record['explained']:.6g} "
        f"(logit bias {record['logit_bias']:.4g}); completeness residual {record['completeness']['residual']:.1e}"
    )


def _export(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.data.export import export_png_folder
    from fact_model.data.sources import open_split
    from fact_model.training.common import print_summary

    spec = _data_spec(args)
    if not spec.is_synthetic:
        raise ValueError("fact data export writes the embedded dataset; use --data synthetic")
    split = open_split(spec, args.split)
    images, labels = split.materialise()
    class_names = split.class_names
    if args.n is not None:
        if args.n < 1:
            raise ValueError(f"--n must be ≥ 1, got {args.n}")
        images, labels = images[: args.n], labels[: args.n]
    counts = export_png_folder(images, labels, class_names, args.out, overwrite=args.overwrite)
    print_summary("export", {"images": sum(counts.values()), "classes": len(counts), "folder": str(args.out)})


def _digits(args: argparse.Namespace, progress: bool) -> None:
    from fact_model.data.digits import export_digits
    from fact_model.training.common import print_summary

    counts = export_digits(args.out, args.size, args.test_fraction, overwrite=args.overwrite, per_split=args.per_split)
    print_summary("digits", {**{f"{k} images": v for k, v in counts.items()}, "folder": str(args.out)})


_COMMANDS = {
    ("train", "backbone"): _train_backbone,
    ("train", "concepts"): _train_concepts,
    ("evaluate", None): _evaluate,
    ("stats", None): _stats,
    ("quality", None): _quality,
    ("report", None): _report,
    ("faithfulness", None): _faithfulness,
    ("export-onnx", None): _export_onnx,
    ("explain", None): _explain,
    ("data", "export"): _export,
    ("data", "digits"): _digits,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fact`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    command = _COMMANDS[(args.command, getattr(args, "what", None))]
    pin_large_allocations_to_mmap()  # peak memory of a long pass set by the batch, not by its length
    try:
        command(args, progress=not args.quiet and sys.stderr.isatty())
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
