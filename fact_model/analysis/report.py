"""``fact report``: a self-contained HTML report (``report.html`` + PNG files) on a model's concepts.

Sections: evaluation figures; concept quality (C² with every encoder, ground-truth purity
and coverage) for FaCT concepts vs raw B-cos channels vs a random concept, with the
per-class random baseline; histograms of per-unit C²; per-concept galleries (top-activating
images with the concept's heatmap); example decisions (image → top concepts with their
shares and heatmaps, and the lower-layer concepts that built each one). Plots are
matplotlib PNGs next to the HTML; nothing is fetched when the page is opened.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from fact_model import render
from fact_model.analysis.c2 import random_concept_consistency
from fact_model.analysis.quality import QualityReport, UnitScores, concept_quality
from fact_model.explain import concept_input_maps
from fact_model.model import FaCTModel

__all__ = ["write_report"]

log = logging.getLogger(__name__)

GALLERY_CONCEPTS = 8
GALLERY_IMAGES = 6
EXAMPLES = 4


def _save(figure: plt.Figure, path: Path) -> str:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path.name


def _heatmap_on_black(weights: Tensor, x6: Tensor) -> Tensor:
    rgba = render.bcos_colour(weights, x6)
    return render.overlay(rgba, torch.zeros(3, *rgba.shape[:2]))[..., :3]


def _histograms(reports: Sequence[QualityReport], out: Path) -> list[str]:
    names = []
    for layer in dict.fromkeys(r.layer for r in reports):
        rows = [r for r in reports if r.layer == layer]
        encoders = rows[0].encoders
        figure, axes = plt.subplots(1, len(encoders), figsize=(5 * len(encoders), 3.2), squeeze=False)
        for axis, encoder in zip(axes[0], encoders, strict=True):
            for r in rows:
                values = [s.c2[encoder] for s in r.scores if encoder in s.c2]
                label = "FaCT concepts" if r.source == "fact" else "raw channels"
                axis.hist(
                    values, bins=30, range=(-0.2, 1.0), alpha=0.6, label=f"{label} (n={len(values)})", density=True
                )
            axis.axvline(rows[0].random_c2[encoder], color="black", linestyle="--", label="random concept")
            axis.set_title(encoder if len(encoder) < 50 else encoder[:47] + "…", fontsize=8)
            axis.set_xlabel("per-unit C²")
            axis.legend(fontsize=7)
        figure.suptitle(f"{layer}: per-unit C²", y=1.04)
        names.append(_save(figure, out / f"c2_histogram_{layer}.png"))
    return names


def _gallery(
    model: FaCTModel,
    load_images: Callable[[Tensor], Tensor],
    stats: dict[str, Tensor],
    layer: str,
    concept: int,
    out: Path,
) -> str:
    indices = stats[f"{layer}/top_indices"][concept, :GALLERY_IMAGES]
    batch = load_images(indices).float() / 255
    maps, x6 = concept_input_maps(model, batch, layer, torch.full((len(indices), 1), concept))
    figure, axes = plt.subplots(2, len(indices), figsize=(1.6 * len(indices), 3.4), squeeze=False)
    for column in range(len(indices)):
        axes[0, column].imshow(batch[column].permute(1, 2, 0).numpy())
        axes[1, column].imshow(_heatmap_on_black(maps[column, 0], x6[column]).numpy())
        axes[0, column].set_title(f"#{int(indices[column])}", fontsize=7)
        for row in range(2):
            axes[row, column].axis("off")
    figure.suptitle(f"{layer} concept {concept}: top-activating test images and where the concept is", fontsize=8)
    return _save(figure, out / f"gallery_{layer}_{concept}.png")


def _example(model: FaCTModel, image: Tensor, index: int, out: Path) -> tuple[str, str]:
    x = image[None].float() / 255
    expl = model.explain(
        x, top_k=3, maps=True, map_kinds=("concepts", "logit"), map_layers=(model.concept_layers[-1].name,)
    )
    top = expl.layer_names[-1]
    figure, axes = plt.subplots(1, 5, figsize=(9, 2.2))
    axes[0].imshow(x[0].permute(1, 2, 0).numpy())
    axes[0].set_title(f"test #{index}", fontsize=7)
    axes[1].imshow(_heatmap_on_black(expl.maps.logit[0], expl.maps.inputs[0]).numpy())
    axes[1].set_title("logit (all concepts)", fontsize=7)
    lines = []
    for rank, concept in enumerate(expl.top_ids[top][0].tolist()):
        info = next(c for c in expl.top_concepts[0] if c.layer == top and c.concept == concept)
        axes[2 + rank].imshow(_heatmap_on_black(expl.maps.concepts[top][0, rank], expl.maps.inputs[0]).numpy())
        axes[2 + rank].set_title(f"concept {concept}: {info.share:.0%}", fontsize=7)
        children = ""
        for trace in expl.traces:
            if trace.upper == top:
                contrib = trace.contributions[0, rank]
                best = contrib.topk(3)
                children = ", ".join(
                    f"{trace.lower} {int(i)} ({float(c):+.3g})"
                    for c, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
                )
        lines.append(
            f"<li>{html.escape(top)} concept {concept}: contribution {info.contribution:+.3f} "
            f"({info.share:.0%} of the positive total) ← built from {html.escape(children) or '—'}</li>"
        )
    for axis in axes:
        axis.axis("off")
    predicted = model.class_names[int(expl.target[0])]
    figure.suptitle(f"predicted: {predicted}", fontsize=8)
    name = _save(figure, out / f"example_{index}.png")
    residual = float(expl.residual[0])
    text = (
        f"<p>Predicted <b>{html.escape(predicted)}</b>; logit − bias = {float(expl.explained[0]):.4f} = Σ concept "
        f"contributions (residual {residual:.1e}). Other concepts: {float(expl.other_contribution[top][0]):+.3f}.</p>"
        f"<ul>{''.join(lines)}</ul>"
    )
    return name, text


def _quality_table(reports: Sequence[QualityReport], per_class_random: dict[tuple[str, str], float]) -> str:
    parts = []
    for layer in dict.fromkeys(r.layer for r in reports):
        rows = [r for r in reports if r.layer == layer]
        encoders = rows[0].encoders
        head = "".join(f"<th>C² — {html.escape(e)}</th>" for e in encoders)
        body = []
        for r in rows:
            label = "FaCT concepts" if r.source == "fact" else "raw B-cos channels"
            cells = "".join(f"<td>{r.mean_c2(e):.3f}</td>" for e in encoders)
            body.append(
                f"<tr><td>{label}</td><td>{len(r.scores)} / {r.units}</td><td>{r.mean_purity:.3f}</td>"
                f"<td>{r.coverage:.0%}</td>{cells}</tr>"
            )
        cells = "".join(f"<td>{rows[0].random_c2[e]:.4f}</td>" for e in encoders)
        body.append(f"<tr><td>random concept</td><td>–</td><td>–</td><td>–</td>{cells}</tr>")
        cells = "".join(f"<td>{per_class_random[(layer, e)]:.4f}</td>" for e in encoders)
        body.append(f"<tr><td>random concept, per class (mean)</td><td>–</td><td>–</td><td>–</td>{cells}</tr>")
        parts.append(
            f"<h3>{html.escape(layer)}</h3><table><tr><th>units</th><th>scored / total</th><th>mean purity</th>"
            f"<th>coverage</th>{head}</tr>{''.join(body)}</table>"
        )
    return "".join(parts)


def _quality_reports(
    model: FaCTModel,
    images: Tensor,
    part_maps: Tensor,
    part_names: Sequence[str],
    class_part_labels: Sequence[int],
    encoders: Sequence,
    progress: bool,
) -> list[QualityReport]:
    """Concept quality of every concept layer, FaCT concepts then raw channels, lowest layer first."""
    return [
        concept_quality(
            model, images, info.name, encoders, source, part_maps, part_names, class_part_labels, progress=progress
        )
        for info in model.concept_layers
        for source in ("fact", "channels")
    ]


def _per_class_random(
    reports: Sequence[QualityReport], encoders: Sequence, images: Tensor, labels: Tensor, num_classes: int
) -> dict[tuple[str, str], float]:
    """C² of a random concept drawn within one class, averaged over the classes, per (layer, encoder name).

    The baseline depends on the encoder and the images only, so it is computed once per
    encoder and listed under every layer.
    """
    baselines = {}
    for encoder in encoders:
        encoded = torch.cat(
            [encoder.encode(images[i].float() / 255, indices=i) for i in torch.arange(len(images)).split(100)]
        )
        encoded = encoded - encoded.mean(dim=(0, 2, 3), keepdim=True)  # (N, D, H, W), mean-centred
        scores = [
            random_concept_consistency(encoded, 10, repeats=5, pool=(labels == c).nonzero().squeeze(1))
            for c in range(num_classes)
        ]
        baselines[encoder.name] = sum(scores) / len(scores)
    return {(r.layer, name): value for r in reports if r.source == "fact" for name, value in baselines.items()}


def _galleries(
    model: FaCTModel,
    reports: Sequence[QualityReport],
    part_names: Sequence[str],
    stats: dict[str, Tensor],
    stats_images: Callable[[Tensor], Tensor],
    out: Path,
) -> tuple[list[tuple[str, UnitScores, str]], str]:
    """Galleries of the top layer's concepts most consistent by the first (oracle) encoder.

    Returns:
        ``(PNG name, the concept's scores, its part's name)`` per gallery, and the oracle encoder's name.
    """
    top_layer = model.concept_layers[-1].name
    fact_top = next(r for r in reports if r.layer == top_layer and r.source == "fact")
    oracle = fact_top.encoders[0]
    galleries = []
    for score in sorted(fact_top.scores, key=lambda s: -s.c2.get(oracle, 0))[:GALLERY_CONCEPTS]:
        name = _gallery(model, stats_images, stats, top_layer, score.unit, out)
        part = part_names[score.part] if score.part is not None else "?"
        galleries.append((name, score, part))
    return galleries, oracle


def _evaluation_section(evaluation: dict | None) -> str:
    """HTML of ``fact evaluate``'s figures (accuracies, and a table row per concept layer)."""
    if not evaluation:
        return "<p>No evaluation report with the model (run <code>fact evaluate</code>).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(layer['layer'])}</td><td>{layer['num_concepts']} / {layer['k']}</td>"
        f"<td>{layer['image_l0_mean']:.1f}</td><td>{layer['concepts_for_80_percent_mean']:.1f}</td>"
        f"<td>{layer['alive_fraction']:.0%}</td><td>{layer['reconstruction_nmse']:.4f}</td>"
        f"<td>{layer['max_relative_residual']:.1e}</td><td>{layer['shared_concepts']}</td></tr>"
        for layer in evaluation.get("layers", [])
    )
    return (
        f"<p>Accuracy on {evaluation['images']} images: backbone {evaluation['backbone_accuracy']:.2%}, "
        f"FaCT {evaluation['fact_accuracy']:.2%}.</p><table><tr><th>layer</th><th>K / k</th><th>image-L0</th>"
        "<th>concepts for 80 %</th><th>alive</th><th>recon. NMSE</th><th>max rel. residual</th>"
        f"<th>shared concepts</th></tr>{rows}</table>"
    )


def _gallery_section(galleries: Sequence[tuple[str, UnitScores, str]], layer: str, oracle: str | None) -> str:
    """HTML figures of the galleries of ``layer``'s concepts, captioned with their quality."""
    return "".join(
        f"<figure><img src='{name}' alt='top images and heatmaps of {layer} concept {s.unit}'>"
        f"<figcaption>{html.escape(layer)} concept {s.unit}: oracle C² {s.c2.get(oracle, float('nan')):.3f}, "
        f"purity {s.purity:.2f} on <i>{html.escape(part)}</i> ({s.images} top images)</figcaption></figure>"
        for name, s, part in galleries
    )


def _examples_section(examples: Sequence[tuple[str, str]]) -> str:
    """HTML of the example decisions: each figure followed by its text."""
    return "".join(
        f"<figure><img src='{name}' alt='example decision {i}'></figure>{text}"
        for i, (name, text) in enumerate(examples)
    )


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:0.9em}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:0.85em;color:#333}"""


def _page(
    model: FaCTModel, images: int, data_description: dict | None, sections: dict[str, str], histograms: Sequence[str]
) -> str:
    """The whole HTML page around the sections (``evaluation``, ``quality``, ``galleries``, ``examples``)."""
    layers = [info.name for info in model.concept_layers]
    histogram_html = "".join(f"<figure><img src='{h}' alt='histogram of per-unit C2'></figure>" for h in histograms)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FaCT concept report</title>
<style>{_STYLE}</style></head><body>
<h1>FaCT concept report</h1>
<p>Model <code>{html.escape(model.config.backbone)}</code>, concept layers {html.escape(", ".join(layers))};
data <code>{html.escape(json.dumps(data_description or {}))}</code>; {images} evaluation images;
written {datetime.now(UTC).isoformat(timespec="seconds")}.</p>
<h2>Evaluation</h2>{sections["evaluation"]}
<h2>Concept quality: FaCT concepts vs raw channels vs random</h2>
<p>C² as in the FaCT paper (top 5 % images, ≥ 10; attribution-weighted, mean-centred encodings; pair weights
S<sub>i</sub>S<sub>j</sub>), with each encoder named; purity and coverage against the ground-truth part maps
(coverage: share of part types with a unit of purity ≥ 0.8).</p>
{sections["quality"]}
{histogram_html}
<h2>Concept galleries ({html.escape(layers[-1])}, most consistent by the oracle encoder)</h2>{sections["galleries"]}
<h2>Example decisions</h2>{sections["examples"]}
</body></html>
"""


def write_report(
    model: FaCTModel,
    images: Tensor,
    labels: Tensor,
    part_maps: Tensor,
    part_names: Sequence[str],
    class_part_labels: Sequence[int],
    encoders: Sequence,
    out_dir: str | Path,
    stats: dict[str, Tensor] | None = None,
    stats_images: Callable[[Tensor], Tensor] | None = None,
    evaluation: dict | None = None,
    data_description: dict | None = None,
    progress: bool = True,
) -> Path:
    """Compute the figures and write ``out_dir/report.html`` with its PNGs; returns the HTML path.

    Args:
        images: ``(N, 3, H, W)`` uint8 evaluation images; ``labels`` ``(N,)`` their classes.
        part_maps, part_names, class_part_labels: the ground truth (see :func:`concept_quality`).
        encoders: reference encoders of the C²-score, the oracle first.
        stats: concept statistics saved with the model (``fact stats``), for the galleries.
        stats_images: loads the statistics' dataset images by index (uint8 ``(N, 3, H, W)``).
        evaluation: ``fact evaluate``'s JSON record, for the evaluation section.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = _quality_reports(model, images, part_maps, part_names, class_part_labels, encoders, progress)
    per_class_random = _per_class_random(reports, encoders, images, labels, model.num_classes)
    (out / "quality.json").write_text(json.dumps([r.to_dict() for r in reports], indent=2) + "\n")
    histograms = _histograms(reports, out)
    galleries, oracle = [], None
    if stats is not None and stats_images is not None:
        galleries, oracle = _galleries(model, reports, part_names, stats, stats_images, out)
    examples = [_example(model, images[i], i, out) for i in range(EXAMPLES)]
    sections = {
        "evaluation": _evaluation_section(evaluation),
        "quality": _quality_table(reports, per_class_random),
        "galleries": _gallery_section(galleries, model.concept_layers[-1].name, oracle),
        "examples": _examples_section(examples),
    }
    path = out / "report.html"
    path.write_text(_page(model, len(images), data_description, sections, histograms))
    return path
