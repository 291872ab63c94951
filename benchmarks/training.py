"""Training throughput benchmark: ``python -m benchmarks.training``.

Prints, on the default model's architecture and input size (random weights; speed
does not depend on them), medians of:

* backbone training: images/s of the train step (forward, BCE loss, backward, AdamW);
* feature collection: images/s of :func:`~fact_model.training.features.collect_features`
  (explanation-mode forward, the position contributions' backward, sampling, shards);
* SAE training: feature vectors/s of one epoch of :func:`~fact_model.training.concepts.train_sae`
  (TopK encode, gather decode, aux-K loss, decoder projection and renormalisation).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from fact_model._timing import median_seconds
from fact_model.bcos.encoding import encode_rgb
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.data.loading import ImageSplit
from fact_model.model import FaCTModel
from fact_model.training.concepts import ConceptTrainConfig, train_sae
from fact_model.training.features import FeatureShards, collect_features

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="backbone training batch")
    parser.add_argument("--images", type=int, default=512, help="images for feature collection")
    parser.add_argument("--vectors", type=int, default=65536, help="feature vectors for one SAE epoch")
    parser.add_argument("--concepts", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = FaCTConfig(
        backbone="bcos_resnet14",
        backbone_kwargs={"width": args.width},
        class_names=[str(i) for i in range(10)],
        preprocessing=Preprocessing(args.size),
    )
    model = FaCTModel(config)
    rows = []

    # Backbone training step.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(args.batch, 3, args.size, args.size)
    targets = F.one_hot(torch.randint(0, 10, (args.batch,)), 10).float()

    def train_step() -> None:
        loss = F.binary_cross_entropy_with_logits(model.forward_encoded(encode_rgb(images)).logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(train_step, args.repeats)
    rows.append(("backbone training step", f"batch {args.batch}", f"{args.batch / seconds:,.0f} images/s"))

    # Feature collection at the last stage.
    model.eval()
    uint8_images = (torch.rand(args.images, 3, args.size, args.size) * 255).to(torch.uint8)
    split = ImageSplit.from_tensors(uint8_images, torch.randint(0, 10, (args.images,)), config.class_names)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def collect() -> None:
            collect_features(model, split, "layer3", Path(tmp) / str(next(counter)), 16, progress=False)

        seconds = median_seconds(collect, max(1, args.repeats // 2))
        rows.append(
            (
                "feature collection (layer3, 16 positions)",
                f"{args.images} images",
                f"{args.images / seconds:,.0f} images/s",
            )
        )

        # One SAE epoch on random features of layer3's width.
        dim = model.backbone.stage_channels("layer3")
        shard_dir = Path(tmp) / "sae"
        shard_dir.mkdir()
        save_file({"features": torch.randn(args.vectors, dim)}, str(shard_dir / "shard_00000.safetensors"))
        (shard_dir / "done.json").write_text(
            f'{{"shards": ["shard_00000.safetensors"], "count": {args.vectors}, "dim": {dim}}}'
        )
        shards = FeatureShards.open(shard_dir)
        spec = ConceptLayerSpec("layer3", args.concepts, args.k)
        sae_config = ConceptTrainConfig(epochs=1)
        runs = iter(range(10**6))

        def sae_epoch() -> None:
            train_sae(shards, spec, sae_config, lambda state: 0.0, Path(tmp) / f"ckpt{next(runs)}", progress=False)

        seconds = median_seconds(sae_epoch, max(1, args.repeats // 2))
        rows.append(
            (f"SAE training (C={dim}, K={args.concepts}, k={args.k}, batch 1024)", f"{args.vectors} vectors",
             f"{args.vectors / seconds:,.0f} vectors/s")
        )  # fmt: skip

    table = Table(title=f"training throughput — bcos_resnet14 w{args.width}, {args.size}px, median of {args.repeats}")
    for column in ("step", "work", "throughput"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    Console().print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
