"""The service's logic, free of BentoML: decode → preprocess → explain → render → response dicts.

``service.py`` only adapts HTTP to these methods; tests can drive the engine directly.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fact_model import render
from fact_model.analysis.concept_stats import STATS_META, load_concept_stats
from fact_model.artifacts import load, read_manifest
from fact_model.bcos.encoding import encode_rgb
from fact_model.explain import (
    ContrastEqualsTargetError,
    closed_form_applies,
    closed_form_code_gradient,
    concept_input_maps,
)
from fact_model.explanation import Explanation, rank_classes
from fact_model.model import FaCTModel
from service.errors import RequestError
from service.images import decode_image, default_max_pixels
from service.settings import Settings

__all__ = ["HEATMAP_FORMATS", "HEATMAP_KINDS", "Engine"]

log = logging.getLogger(__name__)

HEATMAP_FORMATS = ("none", "png", "array")
HEATMAP_KINDS = ("bcos", "signed")
TOP_CLASSES = 5
_CLASS_INDEX = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only: "٣" or "²" are names, not numbers


class Engine:
    """A loaded FaCT model plus everything the endpoints need.

    Args:
        artifact_dir: the model artifact (``model.safetensors``, ``manifest.json``,
            optional ``concept_stats.*`` and ``evaluation.json``).
        settings: limits and device.
        name, version: how the model is reported (the BentoML tag when served from the store).
    """

    def __init__(self, artifact_dir: str | Path, settings: Settings, name: str, version: str) -> None:
        self.settings = settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.artifact_dir = Path(artifact_dir)
        self.device = settings.resolve_device()
        self.model: FaCTModel = load(self.artifact_dir, device=self.device)
        self.manifest = read_manifest(self.artifact_dir)
        self.name, self.version = name, version
        self.layer_names = tuple(info.name for info in self.model.concept_layers)
        self.stats, self.stats_meta = None, None
        if (self.artifact_dir / STATS_META).is_file():
            self.stats, self.stats_meta = load_concept_stats(self.artifact_dir)
        evaluation = self.artifact_dir / "evaluation.json"
        self.evaluation = json.loads(evaluation.read_text()) if evaluation.is_file() else None
        self.closed_form = closed_form_applies(self.model)
        self.onnx = None
        if settings.runtime == "onnx":
            from fact_model.onnx_runtime import OnnxPredictor

            self.onnx = OnnxPredictor(self.artifact_dir, device=self.device, threads=settings.torch_threads)

    # ------------------------------------------------------------------ helpers
    @property
    def model_identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "weights_sha256": self.manifest["weights"]["sha256"]}

    @property
    def max_pixels(self) -> int:
        """Largest image (width × height) accepted: ``FACT_MAX_PIXELS``, else chosen from the model's input size."""
        return self.settings.max_pixels or default_max_pixels(self.model.config.preprocessing.input_size)

    def decode(self, data: bytes) -> Image.Image:
        """Untrusted image bytes → a decoded image (JPEGs decoded at the smallest scale the model needs)."""
        recipe = self.model.config.preprocessing
        target_size = recipe.resize or recipe.input_size
        return decode_image(data, self.settings.max_request_bytes, self.max_pixels, target_size=target_size)

    def resolve_class(self, value: int | str | None, what: str) -> int | None:
        """A class given by index (an int, or a string of ASCII digits) or by name → its index; None stays None."""
        if value is None:
            return None
        names = self.model.class_names
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise RequestError(400, "unknown_class", f"{what} must be a class index or name, got {value!r}")
        if isinstance(value, int) or _CLASS_INDEX.fullmatch(value.strip()):
            index = int(value)
            if not 0 <= index < len(names):
                raise RequestError(
                    400, "unknown_class", f"{what} class index {index} is out of range [0, {len(names) - 1}]"
                )
            return index
        if value in names:
            return names.index(value)
        raise RequestError(
            400,
            "unknown_class",
            f"unknown {what} class {value[:100]!r}: use a class index in [0, {len(names) - 1}] or a class name "
            "(GET /model lists the class names)",
        )

    def check_top_k(self, top_k: int) -> int:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.settings.max_top_k:
            raise RequestError(
                400, "bad_top_k", f"top_k must be an integer in [1, {self.settings.max_top_k}], got {top_k!r}"
            )
        return top_k

    def check_layers(self, layers: Sequence[str] | None) -> tuple[str, ...]:
        if not layers:
            return self.layer_names
        unknown = sorted({name for name in layers if name not in self.layer_names})
        if unknown:
            shown = ", ".join(repr(name[:64]) for name in unknown[:5]) + (" …" if len(unknown) > 5 else "")
            raise RequestError(
                400,
                "unknown_layer",
                f"unknown concept layer(s) {shown}; this model's concept layers: {list(self.layer_names)}",
            )
        repeated = sorted({name for name in layers if list(layers).count(name) > 1})
        if repeated:
            raise RequestError(400, "unknown_layer", f"layers lists {repeated} more than once")
        return tuple(name for name in self.layer_names if name in layers)  # forward order

    def _class_entry(self, logits: torch.Tensor, probabilities: torch.Tensor, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "name": self.model.class_names[index],
            "probability": float(probabilities[index]),
            "logit": float(logits[index]),
        }

    def _classes(
        self, logits: torch.Tensor, probabilities: torch.Tensor, ranking: torch.Tensor
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(prediction, top_classes)`` of one image from its class ranking (:func:`rank_classes`): one order."""
        top = [self._class_entry(logits, probabilities, c) for c in ranking[:TOP_CLASSES].tolist()]
        return top[0], top

    # ------------------------------------------------------------------ warm-up
    def warmup(self) -> dict[str, tuple[float, int]]:
        """Run each kind of model call once (first calls pay one-off costs).

        Returns route → (seconds of a warm call, its work units: images × (1 + top_k) for explanations).
        """
        size = self.model.config.preprocessing.input_size
        image = Image.new("RGB", (size, size), (120, 80, 60))
        self.predict([image], top_k=3)
        self.explain(image, None, None, 3, None, "png", "bcos")
        timings = {}
        started = time.perf_counter()
        self.predict([image], top_k=3)
        timings["predict"] = (time.perf_counter() - started, 1)
        started = time.perf_counter()
        self.explain(image, None, None, 5, None, "png", "bcos")
        timings["explain"] = timings["explain_batch"] = (time.perf_counter() - started, 1 + 5)
        return timings

    # ------------------------------------------------------------------ predict
    def predict(self, images: list[Image.Image], top_k: int = 5) -> list[dict[str, Any]]:
        """Classes, probabilities and the last concept layer's top contributions (closed form)."""
        if not images:
            return []
        batch = self.model.preprocess(images).to(self.device)
        top_layer = self.layer_names[-1]
        if self.onnx is not None:
            return self._predict_onnx(batch, top_k, top_layer)
        if self.closed_form:
            with torch.no_grad():
                record = self.model.forward_encoded(encode_rgb(batch))
            logits, ranking = record.logits, rank_classes(record.scores)
            predicted = ranking[:, 0]
            codes = record.codes[top_layer]
            contributions = codes.scatter(codes.values * closed_form_code_gradient(self.model, record, predicted))
        else:
            expl = self.model.explain(batch, top_k=0)
            logits, ranking, contributions = expl.logits, expl.ranking, expl.contributions[top_layer]
        probabilities = self.model.probabilities(logits)
        top = contributions.topk(min(top_k, contributions.shape[1]), dim=1)
        results = []
        for n in range(len(images)):
            prediction, top_classes = self._classes(logits[n], probabilities[n], ranking[n])
            results.append(
                {
                    "prediction": prediction,
                    "top_classes": top_classes,
                    "concepts": [
                        {"layer": top_layer, "id": int(i), "contribution": float(c)}
                        for c, i in zip(top.values[n].tolist(), top.indices[n].tolist(), strict=True)
                    ],
                    "logit_bias": self.model.logit_bias,
                    "model": self.model_identity,
                }
            )
        return results

    def _predict_onnx(self, batch: torch.Tensor, top_k: int, top_layer: str) -> list[dict[str, Any]]:
        outputs = self.onnx.run(batch)
        logits = torch.from_numpy(outputs["logits"])
        ranking = torch.from_numpy(outputs["ranking"])  # the order the graph explained (OnnxPredictor.run)
        probabilities = self.model.probabilities(logits)
        k = min(top_k, outputs["top_ids"].shape[1])
        results = []
        for n in range(len(batch)):
            prediction, top_classes = self._classes(logits[n], probabilities[n], ranking[n])
            results.append(
                {
                    "prediction": prediction,
                    "top_classes": top_classes,
                    "concepts": [
                        {"layer": top_layer, "id": int(i), "contribution": float(c)}
                        for i, c in zip(outputs["top_ids"][n, :k], outputs["top_contributions"][n, :k], strict=True)
                    ],
                    "logit_bias": self.model.logit_bias,
                    "model": self.model_identity,
                }
            )
        return results

    # ------------------------------------------------------------------ explain
    def explain(
        self,
        image: Image.Image,
        target: int | str | None,
        contrast: int | str | None,
        top_k: int,
        layers: Sequence[str] | None,
        heatmaps: str,
        heatmap_kind: str,
        preprocess_ms: float = 0.0,
    ) -> dict[str, Any]:
        return self.explain_many([image], [target], [contrast], top_k, layers, heatmaps, heatmap_kind, preprocess_ms)[0]

    def explain_many(
        self,
        images: list[Image.Image],
        targets: list[int | str | None],
        contrasts: list[int | str | None],
        top_k: int,
        layers: Sequence[str] | None,
        heatmaps: str,
        heatmap_kind: str,
        decode_ms: float = 0.0,
    ) -> list[dict[str, Any]]:
        """One explanation per image, computed as one batch (targets may differ per image)."""
        top_k = self.check_top_k(top_k)
        selected = self.check_layers(layers)
        if heatmaps not in HEATMAP_FORMATS:
            raise RequestError(
                400, "bad_heatmaps", f"heatmaps must be one of {list(HEATMAP_FORMATS)}, got {heatmaps!r}"
            )
        if heatmap_kind not in HEATMAP_KINDS:
            raise RequestError(
                400, "bad_heatmap_kind", f"heatmap_kind must be one of {list(HEATMAP_KINDS)}, got {heatmap_kind!r}"
            )
        target_idx = [self.resolve_class(t, "target") for t in targets]
        contrast_idx = [self.resolve_class(c, "contrast") for c in contrasts]
        started = time.perf_counter()
        batch = self.model.preprocess(images).to(self.device)
        preprocess_ms = decode_ms + 1e3 * (time.perf_counter() - started)

        primary = selected[-1]
        with_maps = heatmaps != "none"
        explanations = self._explain_grouped(batch, target_idx, contrast_idx, top_k, with_maps, primary)
        results = []
        for expl, row in explanations:
            started = time.perf_counter()
            result = self._response(expl, row, selected, primary, heatmaps, heatmap_kind)
            render_ms = 1e3 * (time.perf_counter() - started)
            result["timings_ms"] = {
                "preprocess": preprocess_ms / len(images),
                "forward": expl.timings_ms["forward"] / len(images),
                "backward": expl.timings_ms["backward"] / len(images),
                "render": render_ms,
            }
            results.append(result)
        return results

    def _explain_grouped(
        self,
        batch: torch.Tensor,
        target_idx: list[int | None],
        contrast_idx: list[int | None],
        top_k: int,
        with_maps: bool,
        primary: str,
    ) -> list[tuple[Explanation, int]]:
        """Explain the batch; images with a contrast are explained in their own call (contrast is all-or-none)."""
        n = batch.shape[0]
        out: list[tuple[Explanation, int] | None] = [None] * n
        groups: dict[bool, list[int]] = {}
        for i in range(n):
            groups.setdefault(contrast_idx[i] is not None, []).append(i)
        for has_contrast, rows in groups.items():
            targets = [target_idx[i] for i in rows]
            target_arg = None if all(t is None for t in targets) else targets
            if target_arg is not None and any(t is None for t in targets):
                # mix of explicit and default targets: resolve the defaults from a plain forward pass
                with torch.no_grad():
                    scores = self.model.forward_encoded(encode_rgb(batch[rows]), concepts=True).scores
                predicted = rank_classes(scores)[:, 0].tolist()
                target_arg = [p if t is None else t for t, p in zip(targets, predicted, strict=True)]
            try:
                expl = self.model.explain(
                    batch[rows],
                    target=target_arg,
                    contrast=[contrast_idx[i] for i in rows] if has_contrast else None,
                    top_k=top_k,
                    maps=with_maps,
                    map_kinds=("concepts",),
                    map_layers=(primary,),
                )
            except ContrastEqualsTargetError as err:
                raise RequestError(400, "contrast_equals_target", str(err)) from None
            for j, i in enumerate(rows):
                out[i] = (expl, j)
        return out  # type: ignore[return-value]  (every row was filled)

    def _heatmaps(self, weights: torch.Tensor, inputs: torch.Tensor, heatmaps: str, kind: str) -> list[dict[str, Any]]:
        """One heatmap per map in ``weights`` ``(R, 6, H, W)`` of one image ``inputs`` ``(6, H, W)``."""
        contributions = (inputs[None] * weights).sum(dim=1)  # (R, H, W)
        if heatmaps == "array":
            return [
                {"format": "array", "kind": "contribution", "shape": list(c.shape), "data": c.tolist()}
                for c in contributions
            ]
        if kind == "bcos":  # all maps of the image in one call
            rgba = render.bcos_colour(weights, inputs[None].expand_as(weights))
        else:
            rgba = torch.stack([render.signed_heatmap(c, inputs[:3]) for c in contributions])
        return [
            {
                "format": "png",
                "kind": kind,
                "size": list(contributions.shape[1:]),
                "png_base64": base64.b64encode(render.to_png(image.cpu())).decode(),
            }
            for image in rgba
        ]

    def _response(
        self, expl: Explanation, n: int, selected: tuple[str, ...], primary: str, heatmaps: str, kind: str
    ) -> dict[str, Any]:
        logits, probabilities = expl.logits[n], expl.probabilities[n]
        prediction, top_classes = self._classes(logits, probabilities, expl.ranking[n])
        contributions = expl.contributions[primary][n]
        positive = float(contributions.clamp(min=0).sum())
        ids = expl.top_ids[primary][n].tolist()
        lower = selected[-2] if len(selected) > 1 else None
        trace = next((t for t in expl.traces if t.upper == primary and t.lower == lower), None)
        concepts = []
        maps = None
        if heatmaps != "none" and expl.maps is not None and ids:
            maps = self._heatmaps(expl.maps.concepts[primary][n], expl.maps.inputs[n], heatmaps, kind)
        for rank, concept in enumerate(ids):
            value = float(contributions[concept])
            entry: dict[str, Any] = {
                "layer": primary,
                "id": concept,
                "contribution": value,
                "share": value / positive if positive > 0 else 0.0,
                "activation": float(expl.activations[primary][n, concept]),
                "heatmap": maps[rank] if maps is not None else None,
                "children": [],
            }
            if trace is not None:
                child_contrib = trace.contributions[n, rank]
                top_children = child_contrib.topk(min(3, child_contrib.numel()))
                entry["children"] = [  # their contributions are to this concept's activation, not the logit
                    {"layer": lower, "id": int(i), "contribution_to_parent": float(c)}
                    for c, i in zip(top_children.values.tolist(), top_children.indices.tolist(), strict=True)
                ]
            concepts.append(entry)
        explained = float(expl.explained[n])
        residual = float(expl.residuals[primary][n])
        scale = float(contributions.abs().sum())
        target = int(expl.target[n])
        return {
            "prediction": prediction,
            "top_classes": top_classes,
            "target": {"index": target, "name": self.model.class_names[target]},
            "contrast": None
            if expl.contrast is None
            else {"index": int(expl.contrast[n]), "name": self.model.class_names[int(expl.contrast[n])]},
            "explained": explained,
            "logit_bias": expl.logit_bias,
            "layer": primary,
            "concepts": concepts,
            "other": {"contribution": float(expl.other_contribution[primary][n])},
            "completeness": {
                "residual": residual,
                "relative_residual": residual / scale if scale > 0 else 0.0,
                "sum_of_contributions": float(contributions.sum()),
            },
            "active_concepts": {name: int((expl.activations[name][n] > 0).sum()) for name in selected},
            "faithfulness": {"method": "fact", "exact": True},
            "model": self.model_identity,
        }

    # ------------------------------------------------------------------ model and concept cards
    def model_summary(self) -> dict[str, Any]:
        return {
            **self.model_identity,
            "architecture": self.model.config.backbone,
            "classes": list(self.model.class_names),
            "concept_layers": [
                {"name": i.name, "num_concepts": i.num_concepts, "k": i.k, "channels": i.in_features}
                for i in self.model.concept_layers
            ],
            "input_size": self.model.config.preprocessing.input_size,
            "preprocessing": self.manifest["model"]["preprocessing"],
            "output_activation": self.model.config.output_activation,
            "logit_bias": self.model.logit_bias,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "evaluation": None
            if self.evaluation is None
            else {
                k: self.evaluation[k] for k in ("backbone_accuracy", "fact_accuracy", "images") if k in self.evaluation
            },
            "concept_statistics": self.stats_meta is not None,
            "runtime": {
                "predict": "onnxruntime" if self.onnx is not None else "pytorch",
                "explain": "pytorch",
                **({"onnx_providers": self.onnx.providers} if self.onnx is not None else {}),
            },
        }

    def _check_concept(self, layer: str, concept: int | None = None) -> None:
        if layer not in self.layer_names:
            raise RequestError(
                404, "unknown_layer", f"no concept layer {layer!r}; concept layers: {list(self.layer_names)}"
            )
        if self.stats is None:
            raise RequestError(404, "no_statistics", "this model has no concept statistics (run `fact stats`)")
        if concept is not None:
            k = self.model.concept_layer(layer).num_concepts
            if not 0 <= concept < k:
                raise RequestError(
                    404, "unknown_concept", f"concept id {concept} is out of range [0, {k - 1}] for {layer!r}"
                )

    def concept_list(self, layer: str) -> dict[str, Any]:
        self._check_concept(layer)
        frequency = self.stats[f"{layer}/frequency"]
        class_means = self.stats[f"{layer}/class_mean_contributions"]  # (classes, K)
        best_class = class_means.argmax(dim=0)
        return {
            "layer": layer,
            "concepts": [
                {
                    "id": k,
                    "frequency": float(frequency[k]),
                    "top_class": self.model.class_names[int(best_class[k])],
                    "top_class_mean_contribution": float(class_means[best_class[k], k]),
                }
                for k in range(len(frequency))
            ],
        }

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one engine per worker; bounded)
    def concept_card(self, layer: str, concept: int, examples: int = 6) -> dict[str, Any]:
        self._check_concept(layer, concept)
        stats = self.stats
        class_means = stats[f"{layer}/class_mean_contributions"][:, concept]
        supports = [
            {"index": c, "name": self.model.class_names[c], "mean_contribution": float(class_means[c])}
            for c in class_means.argsort(descending=True).tolist()
            if float(class_means[c]) > 0
        ]
        top_indices = stats[f"{layer}/top_indices"][concept, :examples].tolist()
        top_activations = stats[f"{layer}/top_activations"][concept, :examples].tolist()
        examples_out = []
        images = self._example_images(top_indices)
        if images is not None:
            batch = self.model.preprocess(images)
            maps, x6 = concept_input_maps(self.model, batch, layer, torch.full((len(images), 1), concept))
            for i, (index, activation) in enumerate(zip(top_indices, top_activations, strict=True)):
                png_image = render.to_png(render.overlay(torch.zeros(*batch.shape[-2:], 4), batch[i]))
                rgba = render.bcos_colour(maps[i, 0], x6[i])
                examples_out.append(
                    {
                        "index": index,
                        "activation": activation,
                        "image_png_base64": base64.b64encode(png_image).decode(),
                        "heatmap_png_base64": base64.b64encode(render.to_png(rgba)).decode(),
                    }
                )
        else:
            examples_out = [{"index": i, "activation": a} for i, a in zip(top_indices, top_activations, strict=True)]
        return {
            "layer": layer,
            "id": concept,
            "frequency": float(stats[f"{layer}/frequency"][concept]),
            "supports": supports,
            "examples": examples_out,
            "dataset": (self.stats_meta or {}).get("data"),
        }

    def _example_images(self, indices: list[int]) -> list[Image.Image] | None:
        """The statistics' dataset images by index, when they can be regenerated or read here."""
        description = (self.stats_meta or {}).get("data") or {}
        if description.get("dataset") == "synthetic":
            from fact_model.data.synthetic import SyntheticConfig, render_sample

            fields = {k: description[k] for k in ("image_size", "seed", "train", "val", "test", "max_distractors")}
            config = SyntheticConfig(**fields)
            return [Image.fromarray(render_sample(config, description["split"], i)[0]) for i in indices]
        return None
