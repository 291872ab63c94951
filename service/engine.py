"""The service's logic, free of BentoML: decode → preprocess → explain → render → response dicts.

``service.py`` only adapts HTTP to these methods; tests can drive the engine directly.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from fact_model import options, regions, render, serialize
from fact_model.analysis.concept_stats import STATS_META, load_concept_stats
from fact_model.artifacts import load, read_manifest
from fact_model.bcos.encoding import encode_rgb
from fact_model.concept_labels import LabelStore, default_labels_path
from fact_model.explain import (
    ContrastEqualsTargetError,
    closed_form_applies,
    closed_form_contributions,
    concept_input_maps,
)
from fact_model.explanation import Explanation, rank_classes
from fact_model.model import FaCTModel
from service.cards import ExampleImages, check_statistics
from service.compute import Compute
from service.errors import RequestError
from service.images import decode_image, default_max_pixels
from service.queries import ConceptQuery, RegionQuery, region_mask, region_record, where_values
from service.settings import Settings

__all__ = ["HEATMAP_FORMATS", "HEATMAP_KINDS", "MIN_HEATMAP_SIZE", "Engine"]

log = logging.getLogger(__name__)

HEATMAP_FORMATS = ("none", *render.ENCODINGS, "array", "float32")
"""``none``; images: ``png`` (lossless), ``png8`` (palette), ``webp`` (lossy); exact floats: ``array`` (JSON
lists), ``float32`` (base64 of little-endian float32, row-major)."""
HEATMAP_KINDS = ("bcos", "signed", "spatial")
"""``bcos`` / ``signed``: per-pixel maps of each concept's activation (one backward pass per concept);
``spatial``: each concept's contribution to the explained logit per feature-map position (closed form:
no backward pass), drawn as a signed map over the image."""
MIN_HEATMAP_SIZE = 8
"""Smallest ``heatmap_size`` (pixels per side); the largest is the model's input size."""
T = TypeVar("T")
_CLASS_INDEX = re.compile(r"-?[0-9]{1,9}")  # ASCII digits only: "٣" or "²" are names, not numbers


def _model_work(method: Callable[..., T]) -> Callable[..., T]:
    """Run an engine method as model work: the library options (``settings.options``) and, on CUDA,
    the model thread's stream in force (:meth:`service.compute.Compute.session`)."""

    @functools.wraps(method)
    def wrapper(self: Engine, *args: Any, **kwargs: Any) -> T:
        with options.using(self.settings.options), self.compute.session():
            return method(self, *args, **kwargs)

    return wrapper


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
        # Built here, on the thread that runs the model from now on: it owns the CUDA stream.
        self.compute = Compute(self.device, settings.dtype)
        self.model: FaCTModel = load(self.artifact_dir, device=self.device).to(self.compute.model_dtype)
        self.manifest = read_manifest(self.artifact_dir)
        self.name, self.version = name, version
        self.layer_names = tuple(info.name for info in self.model.concept_layers)
        self.stats, self.stats_meta, self.stats_error = None, None, None
        if (self.artifact_dir / STATS_META).is_file():
            try:
                self.stats, self.stats_meta = load_concept_stats(self.artifact_dir)
            except Exception as err:  # a corrupt or mismatching file: cards say so; the model still serves
                self.stats_error = f"the model's concept statistics cannot be read ({type(err).__name__}: {err})"
                log.warning("%s", self.stats_error)
        self.stats_problems = (
            {}
            if self.stats is None
            else check_statistics(
                self.stats, {i.name: i.num_concepts for i in self.model.concept_layers}, self.model.num_classes
            )
        )
        for layer, problem in self.stats_problems.items():
            if problem is not None:
                log.warning("concept cards of %s unavailable: %s", layer, problem)
        self.example_images = ExampleImages((self.stats_meta or {}).get("data"), tuple(self.model.class_names))
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.artifact_bytes = {f.name: f.stat().st_size for f in sorted(self.artifact_dir.iterdir()) if f.is_file()}
        evaluation = self.artifact_dir / "evaluation.json"
        self.evaluation = json.loads(evaluation.read_text()) if evaluation.is_file() else None
        self.closed_form = closed_form_applies(self.model)
        self.labels = LabelStore(
            settings.labels_path or default_labels_path(self.artifact_dir),
            self.manifest["weights"]["sha256"],
            {i.name: i.num_concepts for i in self.model.concept_layers},
        )
        self.onnx = None
        if settings.runtime == "onnx":
            from fact_model.onnx_runtime import OnnxPredictor

            self.onnx = OnnxPredictor(self.artifact_dir, device=self.device, threads=settings.torch_threads)

    # ------------------------------------------------------------------ helpers
    @property
    def model_identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "weights_sha256": self.manifest["weights"]["sha256"]}

    @property
    def input_size(self) -> int:
        """Side of the square model input, in pixels (the default and largest ``heatmap_size``)."""
        return self.model.config.preprocessing.input_size

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

    def check_heatmaps(self, heatmaps: str, kind: str, size: int | None) -> int:
        """Validate the heatmap options; returns the output side length in pixels (``size`` or the input size)."""
        if heatmaps not in HEATMAP_FORMATS:
            raise RequestError(
                400, "bad_heatmaps", f"heatmaps must be one of {list(HEATMAP_FORMATS)}, got {heatmaps!r}"
            )
        if kind not in HEATMAP_KINDS:
            raise RequestError(
                400, "bad_heatmap_kind", f"heatmap_kind must be one of {list(HEATMAP_KINDS)}, got {kind!r}"
            )
        if size is None:
            return self.input_size
        if isinstance(size, bool) or not isinstance(size, int) or not MIN_HEATMAP_SIZE <= size <= self.input_size:
            shown = repr(size) if len(repr(size)) <= 40 else repr(size)[:40] + "…"
            raise RequestError(
                400,
                "invalid_request",
                f"field 'heatmap_size' must be an integer in [{MIN_HEATMAP_SIZE}, {self.input_size}] (pixels per "
                f"side; {self.input_size} is this model's input size, the default), got {shown}",
            )
        return size

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

    def with_labels(self, record: Any, layer: str | None = None, labels: dict | None = None) -> Any:
        """``record`` with the current label of every concept it names (``label``: the label's record or None).

        A concept is a dict with ``layer`` and ``id`` (explanations, predictions, regions, ``where``,
        concept cards) or an intervention's edit (``concept`` and ``factor``, of the record's ``layer``).
        One read of the label file (a ``stat`` when unchanged) per record.
        """
        if labels is None:
            labels = self.labels.all()
        if isinstance(record, list):
            return [self.with_labels(item, layer, labels) for item in record]
        if not isinstance(record, dict):
            return record
        layer = record["layer"] if isinstance(record.get("layer"), str) else layer
        out = {key: self.with_labels(value, layer, labels) for key, value in record.items()}
        concept = out.get("id") if "layer" in out else out.get("concept") if "factor" in out else None
        if isinstance(concept, int) and not isinstance(concept, bool) and layer in labels:
            found = labels[layer].get(concept)
            out["label"] = None if found is None else found.to_dict(history=False)
        return out

    # ------------------------------------------------------------------ warm-up
    def warmup(self, every_bucket: bool | None = None) -> dict[str, tuple[float, int]]:
        """Run each kind of model call once (first calls pay one-off costs).

        ``every_bucket`` (default: on CUDA): also run ``/predict`` and ``/explain_batch`` at
        :meth:`warmup_batch_sizes`, so that every batch-size bucket the kernel dispatchers key
        on (:func:`kernels.path_table.batch_bucket`) is timed and every cuDNN plan and Triton
        autotune is made before the first request, not during it.

        Returns route → (seconds of a warm call, its work units: images × (1 + top_k) for explanations).
        """
        size = self.input_size
        image = Image.new("RGB", (size, size), (120, 80, 60))
        if every_bucket is None:
            every_bucket = self.compute.uses_cuda  # nothing is tuned on the CPU
        if every_bucket:
            sizes = self.warmup_batch_sizes()
            for n in sizes["predict"]:
                self.predict([image] * n, top_k=3)
            for n in sizes["explain"]:
                self.explain_many([image] * n, [None] * n, [None] * n, 5, None, "png", "bcos")
            for top_k in sizes["top_k"]:  # single images at every rank-count bucket (FACT_EXPLAIN_VJP=auto)
                self.explain(image, None, None, top_k, None, "png", "bcos")
        self.predict([image], top_k=3)
        self.explain(image, None, None, 3, None, "png", "bcos")
        for heatmaps, kind in (("webp", "signed"), ("png8", "spatial")):  # first use of each encoder
            self.explain(image, None, None, 1, None, heatmaps, kind, heatmap_size=max(MIN_HEATMAP_SIZE, size // 2))
        timings = {}
        started = time.perf_counter()
        self.predict([image], top_k=3)
        timings["predict"] = (time.perf_counter() - started, 1)
        started = time.perf_counter()
        self.explain(image, None, None, 5, None, "png", "bcos")
        seconds = time.perf_counter() - started
        timings["explain"] = timings["explain_batch"] = (seconds, 1 + 5)
        timings["intervene"] = (2 * seconds, 2 * (1 + 5))  # two explanations (before and after the edit)
        return timings

    def warmup_batch_sizes(self) -> dict[str, tuple[int, ...]]:
        """The batch sizes :meth:`warmup` runs per kind of call to meet every dispatcher bucket.

        ``predict``: BentoML merges up to ``FACT_PREDICT_MAX_BATCH`` images; ``explain``: an
        ``/explain_batch`` holds up to ``FACT_MAX_BATCH_ITEMS`` (``/explain`` and ``/intervene``
        are batches of one), run at the default ``top_k`` of 5; ``top_k``: single-image
        explanations at every rank-count bucket up to ``FACT_MAX_TOP_K`` (the loop-or-batched
        choice of ``FACT_EXPLAIN_VJP=auto`` keys on it). :func:`kernels.path_table.covering_batch_sizes`
        says why these suffice; a large batch with an unusual ``top_k`` can still pay one
        measurement at its first call.
        """
        from kernels.path_table import covering_batch_sizes

        return {
            "predict": covering_batch_sizes(self.settings.predict_max_batch),
            "explain": covering_batch_sizes(self.settings.max_batch_items),
            "top_k": covering_batch_sizes(self.settings.max_top_k),
        }

    # ------------------------------------------------------------------ predict
    @_model_work
    def predict(self, images: list[Image.Image], top_k: int = 5) -> list[dict[str, Any]]:
        """Classes, probabilities and the last concept layer's top contributions (closed form when it applies).

        PyTorch and ONNX Runtime compute the same quantities (:func:`closed_form_contributions`,
        exported as :class:`~fact_model.onnx_export.PredictionGraph`); one record builder serves both.
        The merged batch (BentoML's adaptive batching) goes to the device as one pinned copy, is
        computed there as one batch, and its results come back in one copy.
        """
        if not images:
            return []
        logits, probabilities, ranking, top_ids, top_contributions = self.compute.to_host(
            self.predict_tensors(self.model.preprocess(images), top_k)
        )
        layer, names, bias = self.layer_names[-1], self.model.class_names, self.model.logit_bias
        return self.with_labels(
            [
                {
                    **serialize.prediction_record(
                        names, logits[n], probabilities[n], ranking[n], layer, top_ids[n], top_contributions[n], bias
                    ),
                    "model": self.model_identity,
                }
                for n in range(len(images))
            ]
        )

    @_model_work
    def predict_tensors(self, batch: torch.Tensor, top_k: int = 5) -> tuple[torch.Tensor, ...]:
        """:meth:`predict`'s quantities of a preprocessed batch ``(N, 3, S, S)`` in [0, 1] (the tensor protocols).

        Returns ``(logits (N, C), probabilities (N, C), ranking (N, C), top_ids (N, k), top_contributions (N, k))``:
        the last concept layer's top concepts for the predicted class ``ranking[:, 0]``.
        """
        layer = self.layer_names[-1]
        if self.onnx is not None:
            outputs = self.onnx.run(batch.to(self.device))  # the exported graph takes float32
            logits = torch.from_numpy(outputs["logits"])
            ranking = torch.from_numpy(outputs["ranking"])  # the order the graph explained (OnnxPredictor.run)
            k = min(top_k, outputs["top_ids"].shape[1])
            top_ids = torch.from_numpy(outputs["top_ids"][:, :k])
            top_contributions = torch.from_numpy(outputs["top_contributions"][:, :k])
        else:
            logits, ranking, contributions = self._predicted_contributions(self.compute.to_device(batch), layer)
            top = contributions.topk(min(top_k, contributions.shape[1]), dim=1)
            top_ids, top_contributions = top.indices, top.values
        return logits, self.model.probabilities(logits), ranking, top_ids, top_contributions

    def _predicted_contributions(self, batch: torch.Tensor, layer: str) -> tuple[torch.Tensor, ...]:
        """``(logits (N, C), ranking (N, C), contributions (N, K))`` of ``layer``'s concepts to the predicted class."""
        if self.closed_form:
            with torch.no_grad():
                record = self.model.forward_encoded(encode_rgb(batch))
            ranking = rank_classes(record.scores)
            return record.logits, ranking, closed_form_contributions(self.model, record, ranking[:, 0])
        expl = self.model.explain(batch, top_k=0)
        return expl.logits, expl.ranking, expl.contributions[layer]

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
        heatmap_size: int | None = None,
    ) -> dict[str, Any]:
        return self.explain_many(
            [image], [target], [contrast], top_k, layers, heatmaps, heatmap_kind, preprocess_ms, heatmap_size
        )[0]

    @_model_work
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
        heatmap_size: int | None = None,
        region: RegionQuery | None = None,
        where: ConceptQuery | None = None,
    ) -> list[dict[str, Any]]:
        """One explanation per image, computed as one batch (targets may differ per image).

        ``heatmap_size``: side of the heatmaps in pixels, in [:data:`MIN_HEATMAP_SIZE`, input size]
        (None: the input size); images are area-averaged, ``array``/``float32`` maps block-summed.
        ``region``: also rank the concepts by their contribution inside it (``region`` of each
        record); ``where``: also map where one concept contributed (``where``) — :mod:`service.queries`.
        """
        top_k = self.check_top_k(top_k)
        selected = self.check_layers(layers)
        size = self.check_heatmaps(heatmaps, heatmap_kind, heatmap_size)
        target_idx = [self.resolve_class(t, "target") for t in targets]
        contrast_idx = [self.resolve_class(c, "contrast") for c in contrasts]
        region_layer = None if region is None else self._query_layer(region.layer, selected, "region")
        where_layer = None if where is None else self._query_layer(where.layer, selected, "where")
        mask = None if region is None else region_mask(self.model, region)
        started = time.perf_counter()
        batch = self.compute.to_device(self.model.preprocess(images))
        preprocess_ms = decode_ms + 1e3 * (time.perf_counter() - started)

        primary = selected[-1]
        with_maps = heatmaps != "none" and heatmap_kind != "spatial"  # spatial maps need no backward pass
        explanations = self._explain_grouped(batch, target_idx, contrast_idx, top_k, with_maps, primary)
        results = []
        for i, (expl, row) in enumerate(explanations):
            started = time.perf_counter()
            # Everything this response reads, in one device→host copy; the rest runs on the host.
            host = self.compute.to_host(
                {
                    "explanation": expl.image(row, maps=False),
                    "maps": self._rendered_maps(expl, row, batch[i], primary, heatmaps, heatmap_kind, size),
                    "image": batch[i].float() if where is not None else None,
                }
            )
            one = host["explanation"]
            result = self._response(one, host["maps"], selected, heatmaps, heatmap_kind, size)
            if region is not None:
                result["region"] = region_record(one, 0, region_layer, mask, top_k, region)
            if where is not None:
                result["where"] = self._where(one, host["image"], where_layer, where.concept, heatmaps, size, mask)
            result = self.with_labels(result)
            render_ms = 1e3 * (time.perf_counter() - started)
            result["timings_ms"] = {
                "preprocess": preprocess_ms / len(images),
                "forward": expl.timings_ms["forward"] / len(images),
                "backward": expl.timings_ms["backward"] / len(images),
                "render": render_ms,
            }
            results.append(result)
        return results

    # ------------------------------------------------------------------ intervene
    @_model_work
    def intervene(
        self,
        image: Image.Image,
        *,
        layer: str | None = None,
        remove: Sequence[int] = (),
        scale: dict[int, float] | None = None,
        remove_top: int | None = None,
        keep_top: int | None = None,
        target: int | str | None = None,
        contrast: int | str | None = None,
        top_k: int = 5,
        layers: Sequence[str] | None = None,
        heatmaps: str = "none",
        heatmap_kind: str = "bcos",
        heatmap_size: int | None = None,
        decode_ms: float = 0.0,
    ) -> dict[str, Any]:
        """Edit concepts of ``layer`` and explain the edited network (:func:`fact_model.intervention.intervene`).

        The record (:func:`fact_model.serialize.intervention_record`) holds the edits, the explanation
        before and after, and the linear prediction of the change next to the measured one.
        """
        top_k = self.check_top_k(top_k)
        selected = self.check_layers(layers)
        size = self.check_heatmaps(heatmaps, heatmap_kind, heatmap_size)
        edited = self._query_layer(layer, (self.layer_names[-1],), "layer")
        target_idx = self.resolve_class(target, "target")
        contrast_idx = self.resolve_class(contrast, "contrast")
        started = time.perf_counter()
        batch = self.compute.to_device(self.model.preprocess([image]))
        preprocess_ms = decode_ms + 1e3 * (time.perf_counter() - started)
        primary = selected[-1]
        with_maps = heatmaps != "none" and heatmap_kind != "spatial"
        try:
            result = self.model.intervene(
                batch,
                layer=edited,
                remove=list(remove) or None,
                scale=scale or None,
                remove_top=remove_top,
                keep_top=keep_top,
                target=None if target_idx is None else [target_idx],
                contrast=None if contrast_idx is None else [contrast_idx],
                top_k=top_k,
                maps=with_maps,
                map_layers=(primary,),
            )
        except ContrastEqualsTargetError as err:
            raise RequestError(400, "contrast_equals_target", err.message(self.model.class_names)) from None
        except ValueError as err:
            raise RequestError(400, "bad_intervention", str(err)) from None
        started = time.perf_counter()
        rendered = self._rendered_maps(result.after, 0, batch[0], primary, heatmaps, heatmap_kind, size)
        host = self.compute.to_host(
            {
                "result": dataclasses.replace(
                    result, before=result.before.image(0, maps=False), after=result.after.image(0, maps=False)
                ),
                "maps": rendered,
            }
        )  # one device→host copy
        maps = None if rendered is None else self._heatmap_records(host["maps"], heatmaps, heatmap_kind, size)
        record = self.with_labels(
            serialize.intervention_record(host["result"], 0, self.model.class_names, selected, maps)
        )
        before, after = result.before.timings_ms, result.after.timings_ms
        timings = {name: before[name] + after[name] for name in ("forward", "backward")}
        return {
            **record,
            "model": self.model_identity,
            "timings_ms": {"preprocess": preprocess_ms, **timings, "render": 1e3 * (time.perf_counter() - started)},
        }

    def _query_layer(self, layer: str | None, selected: tuple[str, ...], what: str) -> str:
        """The concept layer a region or ``where`` query reads: ``layer``, or the reported one."""
        if layer is None:
            return selected[-1]
        if layer not in self.layer_names:
            raise RequestError(
                400,
                "unknown_layer",
                f"{what}: unknown concept layer {layer[:64]!r}; this model's concept layers: {list(self.layer_names)}",
            )
        return layer

    def _where(
        self,
        expl: Explanation,
        image: torch.Tensor,
        layer: str,
        concept: int,
        heatmaps: str,
        size: int,
        mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Where concept ``concept`` of ``layer`` contributed in ``expl``'s one image: its numbers and a signed map.

        Runs on the host copy of a response (``expl`` and the preprocessed ``image`` ``(3, S, S)``).
        ``in_region``: its contribution inside the request's region (``mask`` ``(S, S)``), or None.
        ``Σ mask ⊙ spread(v) = Σ cell_weights(mask) ⊙ v``, so this equals the region query's own figure.
        """
        values = where_values(expl, 0, layer, concept, self.input_size)  # (S, S), sums to its contribution
        heatmap = None
        if heatmaps in ("array", "float32"):
            heatmap = _float_map(render.sum_pool(values[None], size)[0], heatmaps, "contribution")
        elif heatmaps != "none":
            rgba = render.resize_rgba(render.signed_heatmaps(values[None], image), size)
            heatmap = _image_record(render.encode_rgba(rgba, heatmaps)[0], heatmaps, "signed", size)
        in_region = None if mask is None else float((values * mask).sum())
        return {
            "layer": layer,
            "id": concept,
            "contribution": float(expl.contributions[layer][0, concept]),
            "activation": float(expl.activations[layer][0, concept]),
            "in_region": in_region,
            "heatmap": heatmap,
        }

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
            except ContrastEqualsTargetError as err:  # named by the request's item, not the group's position
                raise RequestError(400, "contrast_equals_target", err.message(self.model.class_names, rows)) from None
            for j, i in enumerate(rows):
                out[i] = (expl, j)
        return out  # type: ignore[return-value]  (every row was filled)

    def _rendered_maps(
        self, expl: Explanation, n: int, image: torch.Tensor, layer: str, heatmaps: str, kind: str, size: int
    ) -> torch.Tensor | None:
        """Image ``n``'s heatmaps of ``layer``'s top concepts, rendered where the model ran; None when none are asked.

        Pixel kinds start from the concept maps ``W`` ``(R, 6, S, S)`` and the encoded input
        ``(6, S, S)``: per-pixel contributions ``Σ_ch x ⊙ W`` ``(R, S, S)`` sum to each concept's
        activation. ``spatial`` starts from ``Explanation.spatial`` ``(R, h, w)`` (sums to each
        concept's contribution). ``image`` ``(3, S, S)`` in [0, 1] is the preprocessed input the
        signed kinds are drawn over.

        Returns ``uint8`` RGBA ``(R, size, size, 4)`` (:func:`fact_model.render.quantise`: images are
        rendered at ``S`` and area-averaged to ``size``) for the image formats, float32 values for
        ``array``/``float32`` (``(R, size, size)`` block sums; ``spatial``: ``(R, h, w)``). Nothing
        here reads a value back, so on a GPU it queues behind the explanation without waiting.
        """
        mapped = expl.maps is not None or kind == "spatial"
        if heatmaps == "none" or not expl.top_ids[layer].shape[1] or not mapped:
            return None
        if kind == "spatial":
            values = expl.spatial[layer][n]  # (R, h, w)
        else:
            weights, inputs = expl.maps.concepts[layer][n], expl.maps.inputs[n]  # (R, 6, S, S), (6, S, S)
            values = (inputs[None] * weights).sum(dim=1)  # (R, S, S)
        if heatmaps in ("array", "float32"):
            if kind != "spatial":  # spatial maps stay at the concept layer's resolution
                values = render.sum_pool(values, size)
            return values.float()
        if kind == "bcos":  # all maps of the image in one call
            rgba = render.bcos_colour(weights, inputs[None].expand_as(weights))
        else:
            if kind == "spatial":  # each position's value spread over its cell of the image (fact_model.regions)
                values = regions.spread_to_pixels(values, tuple(image.shape[-2:]))
            rgba = render.signed_heatmaps(values.float(), image.float(), check_values=False)
        return render.quantise(render.resize_rgba(rgba, size))

    @staticmethod
    def _heatmap_records(rendered: torch.Tensor, heatmaps: str, kind: str, size: int) -> list[dict[str, Any]]:
        """The JSON heatmaps of :meth:`_rendered_maps`' host copy: encoded images, or exact float maps."""
        if heatmaps in ("array", "float32"):
            return [_float_map(v, heatmaps, "spatial" if kind == "spatial" else "contribution") for v in rendered]
        return [_image_record(blob, heatmaps, kind, size) for blob in render.encode_pixels(rendered, heatmaps)]

    def _response(
        self,
        expl: Explanation,
        rendered: torch.Tensor | None,
        selected: tuple[str, ...],
        heatmaps: str,
        kind: str,
        size: int,
    ) -> dict[str, Any]:
        """The explanation record (:func:`fact_model.serialize.explanation_record`) of the one image of ``expl``.

        ``expl`` and ``rendered`` (:meth:`_rendered_maps`) are the response's host copy.
        """
        maps = None if rendered is None else self._heatmap_records(rendered, heatmaps, kind, size)
        record = serialize.explanation_record(expl, 0, self.model.class_names, selected, maps)
        return {**record, "model": self.model_identity}

    # ------------------------------------------------------------------ model and concept cards
    def model_summary(self) -> dict[str, Any]:
        size = self.input_size
        return {
            **self.model_identity,
            "architecture": self.model.config.backbone,
            "classes": list(self.model.class_names),
            "concept_layers": [
                {"name": i.name, "num_concepts": i.num_concepts, "k": i.k, "channels": i.in_features}
                for i in self.model.concept_layers
            ],
            "input_size": size,
            "input_resolution": {"height": size, "width": size, "channels": 3},
            "size": {
                "parameters": self.parameters,
                "weights_bytes": self.artifact_bytes.get("model.safetensors", 0),
                "bytes_on_disk": sum(self.artifact_bytes.values()),
                "files": self.artifact_bytes,
            },
            "preprocessing": self.manifest["model"]["preprocessing"],
            "output_activation": self.model.config.output_activation,
            "logit_bias": self.model.logit_bias,
            "device": self.device,
            "dtype": self.compute.dtype,
            "torch_threads": torch.get_num_threads(),
            "evaluation": None
            if self.evaluation is None
            else {
                k: self.evaluation[k] for k in ("backbone_accuracy", "fact_accuracy", "images") if k in self.evaluation
            },
            "concept_statistics": self.stats is not None,
            "concept_cards": {layer: self._cards_problem(layer) is None for layer in self.layer_names},
            "concept_labels": {
                "writes": "enabled" if self.settings.admin_token else "disabled (set FACT_ADMIN_TOKEN)",
                "count": sum(len(found) for found in self.labels.all().values()),
                "problem": self.labels.problem(),
            },
            "heatmaps": {
                "formats": list(HEATMAP_FORMATS),
                "kinds": list(HEATMAP_KINDS),
                "size": {"min": MIN_HEATMAP_SIZE, "max": size, "default": size},
            },
            "runtime": {
                "predict": "onnxruntime" if self.onnx is not None else "pytorch",
                "explain": "pytorch",
                **({"onnx_providers": self.onnx.providers} if self.onnx is not None else {}),
            },
        }

    def _cards_problem(self, layer: str) -> str | None:
        """Why ``layer`` has no concept cards (a sentence), or None when its statistics are usable."""
        if self.stats_error is not None:
            return self.stats_error
        if self.stats is None:
            return (
                f"this model has no concept statistics, so there are no concept cards or listings; compute them "
                f"with `fact stats --model {self.artifact_dir}` (they are saved next to the model; GET /model "
                "reports concept_statistics)"
            )
        return self.stats_problems.get(layer)

    def _check_concept(self, layer: str, concept: int | None = None) -> None:
        if layer not in self.layer_names:
            raise RequestError(
                404, "unknown_layer", f"no concept layer {layer!r}; concept layers: {list(self.layer_names)}"
            )
        problem = self._cards_problem(layer)
        if problem is not None:
            raise RequestError(404, "no_statistics", problem)
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
        labels = self.labels.all().get(layer, {})
        return {
            "layer": layer,
            "concepts": [
                {
                    "id": k,
                    "frequency": float(frequency[k]),
                    "top_class": self.model.class_names[int(best_class[k])],
                    "top_class_mean_contribution": float(class_means[best_class[k], k]),
                    "label": labels[k].to_dict(history=False) if k in labels else None,
                }
                for k in range(len(frequency))
            ],
        }

    def concept_card(self, layer: str, concept: int, examples: int = 6) -> dict[str, Any]:
        """A concept's card (:meth:`_card`) with its current label (labels change; the rest is cached)."""
        return self.with_labels({**self._card(layer, concept, examples), "layer": layer, "id": concept})

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one engine per worker; bounded)
    @_model_work
    def _card(self, layer: str, concept: int, examples: int = 6) -> dict[str, Any]:
        """A concept's card: frequency, supported classes, top dataset images with heatmaps.

        ``example_images`` says whether the images could be shown (``available``) and if not why
        (``reason``: ``dataset_unreadable``, ``dataset_changed``, ``dataset_unknown``; ``message``):
        the numbers come from the statistics either way.
        """
        self._check_concept(layer, concept)
        stats = self.stats
        class_means = stats[f"{layer}/class_mean_contributions"][:, concept]
        supports = [
            {"index": c, "name": self.model.class_names[c], "mean_contribution": float(class_means[c])}
            for c in class_means.argsort(descending=True).tolist()
            if float(class_means[c]) > 0
        ]
        top_activations = stats[f"{layer}/top_activations"][concept, :examples]
        top_indices = stats[f"{layer}/top_indices"][concept, :examples][top_activations > 0].tolist()
        top_activations = top_activations[top_activations > 0].tolist()  # a concept active in fewer images
        images, availability = self.example_images.get(top_indices)
        examples_out: list[dict[str, Any]] = [
            {"index": i, "activation": a} for i, a in zip(top_indices, top_activations, strict=True)
        ]
        shown = [i for i, image in enumerate(images) if image is not None]
        if shown:
            batch = self.compute.to_device(self.model.preprocess([images[i] for i in shown]))
            maps, x6 = concept_input_maps(self.model, batch, layer, torch.full((len(shown), 1), concept))
            rgba = render.bcos_colour(maps[:, 0], x6)  # (n, S, S, 4)
            opaque = torch.cat([batch.permute(0, 2, 3, 1), torch.ones_like(batch[:, :1]).permute(0, 2, 3, 1)], -1)
            pictures = render.encode_rgba(opaque.cpu(), "png")
            heatmaps = render.encode_rgba(rgba.cpu(), "png")
            for row, i in enumerate(shown):
                examples_out[i]["image_png_base64"] = base64.b64encode(pictures[row]).decode()
                examples_out[i]["heatmap_png_base64"] = base64.b64encode(heatmaps[row]).decode()
        return {
            "layer": layer,
            "id": concept,
            "frequency": float(stats[f"{layer}/frequency"][concept]),
            "supports": supports,
            "examples": examples_out,
            "example_images": availability.to_json(),
            "dataset": (self.stats_meta or {}).get("data"),
        }


def _image_record(blob: bytes, fmt: str, kind: str, size: int) -> dict[str, Any]:
    """One encoded heatmap as JSON (``png_base64`` or ``webp_base64``)."""
    key = "webp_base64" if fmt == "webp" else "png_base64"
    return {
        "format": fmt,
        "kind": kind,
        "size": [size, size],
        "media_type": render.MEDIA_TYPES[fmt],
        key: base64.b64encode(blob).decode(),
    }


def _float_map(values: torch.Tensor, fmt: str, kind: str) -> dict[str, Any]:
    """One exact float map ``(h, w)`` as JSON: nested lists (``array``) or base64 float32 (``float32``)."""
    shape = list(values.shape)
    if fmt == "array":
        return {"format": "array", "kind": kind, "shape": shape, "data": values.tolist()}
    data = values.to(torch.float32).contiguous().numpy()
    if sys.byteorder != "little":
        data = data.byteswap()
    return {
        "format": "float32",
        "kind": kind,
        "shape": shape,
        "dtype": "<f4",
        "data_base64": base64.b64encode(data.tobytes()).decode(),
    }
