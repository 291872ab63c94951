"""``fact faithfulness``: FaCT against the attribution methods other servers deploy, on the same model.

Methods (per-pixel attributions of the explained class's score; channels summed):

* ``fact`` — FaCT's exact input map of ``logit − b`` (``Explanation.maps.logit``; sums to it exactly);
* ``ig15`` / ``ig50`` — Captum's Integrated Gradients, black baseline, 15 (TorchServe's default) and 50
  (Captum's) steps;
* ``input_x_gradient``, ``grad_cam`` (at the last concept layer's stage, ReLU'd, upsampled bilinearly),
  ``occlusion`` (black patches of 1/6 of the side, half-overlapping) — Captum;
* ``random`` — seeded uniform noise, the baseline every metric is read against.

Captum methods run on the model as any user would run them (its plain forward); FaCT runs its own
explanation. LRP (zennit) is not included: its rules assume piecewise-linear layers with biases, and a
B-cos layer's output ``|cos|^{B−1} ŵᵀx`` is neither, so no zennit rule attributes it faithfully.

Metrics (:mod:`fact_model.analysis.attribution_metrics`): completeness error against ``logit − b``;
deletion (most relevant first, MoRF) and insertion AUC of the target's probability (least-relevant-first
deletion is not reported apart: with the same black baseline its curve is the insertion curve mirrored,
``deletion_LeRF(f) = insertion(1 − f)``, so its AUC is the insertion AUC); on the embedded dataset, the
share of positive attribution on the class's parts, on distractors and on background; the grid pointing
game on 2×2 mosaics; milliseconds per image at batch 1 and 32, measured in the same run, with FaCT's full
explanation (what ``/explain`` computes) and a plain forward pass for scale.

At concept level (:func:`concept_removal`): remove the top-n concepts (n = 1, 3, 5) and compare the
measured drop of ``logit − b`` with the sum of their reported contributions, against the same test on
the backbone's raw last-stage channels.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fact_model._timing import median_seconds
from fact_model.analysis.attribution_metrics import (
    completeness_error,
    curve_auc,
    grid_mosaics,
    perturbation_curves,
    quadrant_shares,
    region_shares,
)
from fact_model.model import FaCTModel

__all__ = ["METHODS", "FaithfulnessReport", "attribute", "faithfulness_markdown", "run_faithfulness"]

log = logging.getLogger(__name__)

METHODS = ("fact", "ig15", "ig50", "input_x_gradient", "grad_cam", "occlusion", "random")
CAPTUM_BATCH = 64  # internal_batch_size / perturbations_per_eval of the Captum methods


def _integrated_gradients(
    model: FaCTModel, images: Tensor, targets: Tensor, steps: int, with_delta: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Captum's Integrated Gradients from a black baseline, channels summed: ``(N, H, W)`` [, delta ``(N,)``]."""
    from captum import attr

    result = attr.IntegratedGradients(model).attribute(
        images, baselines=torch.zeros_like(images), target=targets, n_steps=steps,
        internal_batch_size=CAPTUM_BATCH, return_convergence_delta=with_delta,
    )  # fmt: skip
    if with_delta:
        return result[0].sum(dim=1).detach(), result[1].detach()
    return result.sum(dim=1).detach()


def attribute(model: FaCTModel, method: str, images: Tensor, targets: Tensor, seed: int = 0) -> Tensor:
    """Per-pixel attributions ``(N, H, W)`` of class ``targets`` ``(N,)`` in ``images`` ``(N, 3, H, W)`` in [0, 1].

    Raises:
        ValueError: an unknown method.
    """
    from captum import attr

    model.eval()
    n, _, h, w = images.shape
    if method == "fact":
        expl = model.explain(images, target=targets.tolist(), top_k=0, maps=True, map_kinds=("logit",))
        return expl.maps.pixel_contributions(expl.maps.logit).detach()
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(n, h, w, generator=generator).to(images.device)
    if method in ("ig15", "ig50"):
        return _integrated_gradients(model, images, targets, 15 if method == "ig15" else 50)
    forward = model  # what Captum attributes: the plain forward, images → logits (bias included)
    if method == "input_x_gradient":
        result = attr.InputXGradient(forward).attribute(images.clone().requires_grad_(True), target=targets)
    elif method == "grad_cam":
        stage = dict(model.backbone.stages)[model.concept_layers[-1].name]
        cam = attr.LayerGradCam(forward, stage).attribute(images, target=targets, relu_attributions=True)
        return attr.LayerAttribution.interpolate(cam, (h, w), "bilinear")[:, 0].detach()
    elif method == "occlusion":
        window = max(2, h // 6)
        result = attr.Occlusion(forward).attribute(
            images, target=targets, sliding_window_shapes=(3, window, window),
            strides=(3, max(1, window // 2), max(1, window // 2)), baselines=0.0,
            perturbations_per_eval=CAPTUM_BATCH,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown method {method!r}; methods: {list(METHODS)}")
    return result.sum(dim=1).detach()


def ig_convergence_delta(model: FaCTModel, images: Tensor, targets: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``(attributions (N, H, W), Captum's convergence delta (N,))`` of Integrated Gradients (black baseline)."""
    return _integrated_gradients(model, images, targets, steps, with_delta=True)


def _probability(model: FaCTModel) -> Callable[[Tensor, Tensor], Tensor]:
    def score(images: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            return model.probabilities(model(images)).gather(1, targets[:, None]).squeeze(1)

    return score


@dataclass
class FaithfulnessReport:
    """The measured table: method → metric → value (means over images), plus the run's settings."""

    settings: dict[str, Any]
    methods: dict[str, dict[str, float | None]] = field(default_factory=dict)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    concept_removal: dict[str, dict[str, dict[str, float]]] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"settings": self.settings, "methods": self.methods, "curves": self.curves,
             "concept_removal": self.concept_removal},
            indent=2,
        )  # fmt: skip


def _drop_figures(predicted: Tensor, measured: Tensor) -> dict[str, float]:
    """Means over images of the predicted and measured score drops; mean, median and worst relative disagreement."""
    error = (measured - predicted).abs() / predicted.abs().clamp_min(1e-12)
    return {
        "predicted_drop": float(predicted.mean()),
        "measured_drop": float(measured.mean()),
        "relative_error": float(error.mean()),
        "relative_error_median": float(error.median()),
        "relative_error_worst": float(error.max()),
    }


def concept_removal(
    model: FaCTModel, images: Tensor, targets: Tensor, counts: Sequence[int] = (1, 3, 5)
) -> dict[str, dict[str, dict[str, float]]] | None:
    """How well reported contributions predict an intervention: remove the top-n units, measure the score drop.

    ``concepts``: :func:`~fact_model.intervention.intervene` with ``remove_top=n`` at the last concept layer
    (the ``n`` concepts with the largest contribution to ``y = logit[target] − b`` zeroed at every position);
    predicted drop = the sum of their contributions, measured drop = ``y`` minus the edited network's ``y``.
    ``channels``: the same on the plain backbone's last-stage channels, ranked by their exact
    (explanation-mode) contributions ``Σ_p f ⊙ ∂y/∂f``. Both predictions hold exactly for the linearised
    network; the measured drop includes the head's dynamic scale reacting to the removal.

    Returns ``{"concepts": {n: figures}, "channels": {n: figures}}``, or None when the last concept layer
    does not feed the head directly (the channels are compared at the head's input, where the concepts
    must then sit for the two to be comparable).
    """
    from fact_model.bcos.encoding import encode_rgb
    from fact_model.explain import closed_form_applies
    from fact_model.intervention import intervene

    if not closed_form_applies(model):
        return None
    x6 = encode_rgb(model.validate_images(images))
    with model.explanation_mode(), torch.enable_grad():
        plain = model.forward_encoded(x6, concepts=False)
        features = plain.head_input
        y_plain = plain.scores.gather(1, targets[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(y_plain.sum(), features)
    channel_contributions = (features * grad).sum(dim=(2, 3)).detach()  # (N, C): sums to y_plain
    channel_order = channel_contributions.argsort(dim=1, descending=True)
    out: dict[str, dict[str, dict[str, float]]] = {"concepts": {}, "channels": {}}
    for n in counts:
        removal = intervene(model, images, remove_top=n, target=targets, top_k=0)
        out["concepts"][str(n)] = _drop_figures(-removal.predicted_change, -removal.measured_change)
        channels = channel_order[:, :n]
        predicted_c = channel_contributions.gather(1, channels).sum(dim=1)
        mask = torch.ones_like(channel_contributions).scatter(1, channels, 0.0)[:, :, None, None]
        with torch.no_grad():
            after_c = model.backbone.head_scores(features.detach() * mask).gather(1, targets[:, None]).squeeze(1)
        out["channels"][str(n)] = _drop_figures(predicted_c, y_plain.detach() - after_c)
    return out


def _batches(images: Tensor, targets: Tensor, size: int):
    for start in range(0, images.shape[0], size):
        yield images[start : start + size], targets[start : start + size]


def _attribute_all(model: FaCTModel, method: str, images: Tensor, targets: Tensor, batch: int) -> Tensor:
    batches = _batches(images, targets, batch)
    return torch.cat([attribute(model, method, x, t, seed=i) for i, (x, t) in enumerate(batches)])


def _cost_ms(fn: Callable[[Tensor, Tensor], object], images: Tensor, targets: Tensor, repeats: int) -> dict:
    """Milliseconds per image of ``fn(images, targets)`` at batch 1 and at batch ``min(32, N)`` (medians)."""
    many = min(32, images.shape[0])
    return {
        "ms_per_image_b1": 1e3 * median_seconds(lambda: fn(images[:1], targets[:1]), repeats),
        "ms_per_image_b32": 1e3 * median_seconds(lambda: fn(images[:many], targets[:many]), repeats) / many,
    }


def run_faithfulness(
    model: FaCTModel,
    images: Tensor,
    labels: Tensor,
    part_maps: Tensor | None = None,
    class_parts: Sequence[Sequence[int]] | None = None,
    methods: Sequence[str] = METHODS,
    steps: int = 16,
    mosaics: int | None = None,
    timing_repeats: int = 3,
    batch_size: int = 32,
    progress: bool = True,
) -> FaithfulnessReport:
    """Every method on the same images, every metric, in one run.

    Args:
        images: ``(N, 3, H, W)`` in [0, 1]; labels: ``(N,)`` true classes (the explained class is
            the model's prediction).
        part_maps: ``(N, H, W)`` region ids (0 = background) for the part-localisation shares, or None.
        class_parts: per class, the region ids that decide it (with ``part_maps``).
        steps: pixel-flipping steps of the deletion/insertion curves.
        mosaics: 2×2 mosaics for the grid pointing game (default ``N // 4``; 0 skips it).
        timing_repeats: timed calls per method at batch 1 and at batch ``min(32, N)``.
    """
    from tqdm import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; methods: {list(METHODS)}")
    model.eval()
    with torch.no_grad():
        logits = model(images)
    targets = logits.argmax(dim=1)  # the prediction, the class a served explanation explains by default
    explained = logits.gather(1, targets[:, None]).squeeze(1) - model.logit_bias
    score = _probability(model)
    mosaics = images.shape[0] // 4 if mosaics is None else mosaics
    grid_images, grid_classes = grid_mosaics(images, labels, mosaics)
    settings = {
        "images": int(images.shape[0]), "image_size": list(images.shape[-2:]), "steps": steps,
        "mosaics": int(grid_images.shape[0]), "score": "probability of the predicted class",
        "baseline": "black (0)", "torch_threads": torch.get_num_threads(),
        "accuracy": float((targets.cpu() == labels.cpu()).float().mean()),
    }  # fmt: skip
    report = FaithfulnessReport(settings)
    for method in tqdm(methods, desc="methods", disable=not progress):
        started = time.perf_counter()
        maps = _attribute_all(model, method, images, targets, batch_size)
        errors = completeness_error(maps, explained)
        row: dict[str, float | None] = {
            "completeness_error": float(errors.mean()),
            "completeness_error_max": float(errors.max()),
        }
        curves = {
            "deletion_morf": perturbation_curves(score, images, targets, maps, steps),
            "insertion": perturbation_curves(score, images, targets, maps, steps, insert=True),
        }
        for name, curve in curves.items():
            row[f"{name}_auc"] = float(curve_auc(curve).mean())
        report.curves[method] = {name: curve.mean(dim=0).tolist() for name, curve in curves.items()}
        if part_maps is not None and class_parts is not None:
            shares = region_shares(maps, part_maps, [class_parts[int(t)] for t in targets])
            row |= {f"share_{name}": float(value.mean()) for name, value in shares.items()}
        if grid_images.shape[0]:
            quadrant = torch.arange(grid_images.shape[0] * 4) % 4
            grid_targets = grid_classes.flatten()
            grid_maps = _attribute_all(model, method, grid_images.repeat_interleave(4, 0), grid_targets, batch_size)
            row["grid_pointing"] = float(quadrant_shares(grid_maps, quadrant).mean())
        row |= _cost_ms(lambda x, t, m=method: attribute(model, m, x, t), images, targets, timing_repeats)
        report.methods[method] = row
        log.info("%s done in %.1f s", method, time.perf_counter() - started)
    report.concept_removal = concept_removal(model, images, targets)
    # What a served /explain computes: top-5 concepts of every layer with their input maps, the logit's map
    # and the remainder's (``fact`` above maps the logit only, the quantity the other methods attribute).
    full = _cost_ms(
        lambda x, t: model.explain(x, target=t.tolist(), top_k=5, maps=True), images, targets, timing_repeats
    )
    report.settings |= {f"fact_full_explanation_{k}": v for k, v in full.items()}
    with torch.no_grad():
        forward = _cost_ms(lambda x, t: model(x), images, targets, timing_repeats)
    report.settings |= {f"forward_{k}": v for k, v in forward.items()}
    return report


COLUMNS = (
    ("completeness_error", "completeness err. (mean)"),
    ("completeness_error_max", "(max)"),
    ("deletion_morf_auc", "deletion MoRF AUC ↓"),
    ("insertion_auc", "insertion AUC ↑"),
    ("share_parts", "on class parts ↑"),
    ("share_distractors", "on distractors ↓"),
    ("share_background", "on background ↓"),
    ("grid_pointing", "grid pointing ↑"),
    ("ms_per_image_b1", "ms/img b1"),
    ("ms_per_image_b32", "ms/img b32"),
)


def faithfulness_markdown(report: FaithfulnessReport) -> str:
    """The report's table as Markdown (one row per method), with the run's settings underneath."""
    present = [(key, title) for key, title in COLUMNS if any(key in row for row in report.methods.values())]
    lines = ["| method | " + " | ".join(t for _, t in present) + " |", "|---" * (len(present) + 1) + "|"]
    for method, row in report.methods.items():
        cells = []
        for key, _ in present:
            value = row.get(key)
            cells.append("—" if value is None else (f"{value:.1f}" if key.startswith("ms_") else f"{value:.3g}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report.concept_removal:
        lines += ["", "| removed (top-n) | predicted drop | measured drop | relative error (mean) | (median) "
                  "| (worst) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for unit, rows in report.concept_removal.items():
            for n, f in rows.items():
                lines.append(
                    f"| {n} {unit} | {f['predicted_drop']:.4g} | {f['measured_drop']:.4g} | "
                    f"{f['relative_error']:.3g} | {f['relative_error_median']:.3g} | {f['relative_error_worst']:.3g} |"
                )
    lines.append("")
    lines.append("Settings: " + ", ".join(f"{k} = {v}" for k, v in report.settings.items()))
    return "\n".join(lines) + "\n"


def plot_curves(report: FaithfulnessReport, path: Path) -> Path:
    """One PNG: the mean deletion (MoRF) and insertion curves of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for ax, (name, title) in zip(
        axes,
        (("deletion_morf", "deletion, most relevant first (lower is better)"),
         ("insertion", "insertion, most relevant first (higher is better)")),
        strict=True,
    ):  # fmt: skip
        for method, curves in report.curves.items():
            values = curves[name]
            fractions = [i / (len(values) - 1) for i in range(len(values))]
            ax.plot(fractions, values, label=method, linestyle="--" if method == "random" else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_faithfulness(report: FaithfulnessReport, out: Path) -> dict[str, Path]:
    """``faithfulness.json``, ``faithfulness.md`` and ``faithfulness_curves.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "faithfulness.json", "md": out / "faithfulness.md", "png": out / "faithfulness_curves.png"}
    paths["json"].write_text(report.to_json() + "\n")
    paths["md"].write_text(faithfulness_markdown(report))
    plot_curves(report, paths["png"])
    return paths
