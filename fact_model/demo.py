"""``python -m fact_model.demo``: explain a few embedded-dataset test images and write their heatmaps.

Uses the shipped default model (or ``--model DIR``) and prints every identity it checks
(contributions sum to the explained logit exactly). Writes PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fact_model import render
from fact_model.artifacts import load
from fact_model.data.synthetic import SyntheticConfig, SyntheticParts
from fact_model.model import FaCTModel

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default", help="artifact directory, or 'default'")
    parser.add_argument("--images", type=int, default=3, help="number of embedded test images to explain")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where to write the PNG maps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model: FaCTModel = load(args.model)
    origin = f"artifact {args.model!r}"
    size = model.config.preprocessing.input_size
    test_split = SyntheticParts(SyntheticConfig(image_size=size), "test")
    images = torch.stack([test_split[i][0] for i in range(args.images)])
    truth = [test_split.class_names[test_split[i][1]] for i in range(args.images)]
    expl = model.explain(images, top_k=3, maps=True)
    args.out.mkdir(parents=True, exist_ok=True)

    console = Console()
    console.print(f"model: {origin}; concept layers: {[(i.name, i.num_concepts, i.k) for i in model.concept_layers]}")
    for n in range(args.images):
        title = f"test image {n} ({truth[n]!r}): predicted {model.class_names[int(expl.target[n])]!r}"
        table = Table(title=title)
        for column in ("layer", "concept", "contribution", "share", "activation"):
            table.add_column(column)
        for c in expl.top_concepts[n]:
            table.add_row(c.layer, str(c.concept), f"{c.contribution:+.4g}", f"{c.share:.1%}", f"{c.activation:.4g}")
        console.print(table)
        console.print(
            f"logit − bias = {expl.explained[n]:.6g}; Σ contributions = "
            f"{expl.contributions[expl.layer_names[-1]][n].sum():.6g}; residual = {expl.residual[n]:.2e}"
        )
        maps = expl.maps
        assert maps is not None
        top_layer = expl.layer_names[-1]
        for rank in range(maps.concepts[top_layer].shape[1]):
            rgba = render.bcos_colour(maps.concepts[top_layer][n, rank], maps.inputs[n])
            concept = int(expl.top_ids[top_layer][n, rank])
            (args.out / f"image{n}_concept{concept}.png").write_bytes(render.to_png(rgba, size=4 * size))
    console.print(f"heatmaps written to {args.out}/")


if __name__ == "__main__":
    main()
