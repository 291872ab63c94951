"""Concept cards' dataset side: are the statistics usable, and can their images be read here?

A card (``GET /concepts/{layer}/{id}``) shows a concept's top-activating images from the
statistics that ``fact stats`` saved next to the model. Either may be missing on the
serving machine, and neither may ever turn into a 500:

* :func:`check_statistics` — which layers' statistics fit the model (a missing layer, a
  dictionary size or class count that differs: the statistics are stale) and why not;
* :class:`ExampleImages` — the statistics' images by position: regenerated for the embedded
  dataset, read from the image folder for a folder (when it still exists here and still
  holds the same classes), or a clear reason why not (``available: false``), so a card
  still answers with its numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from torch import Tensor

__all__ = ["ExampleImages", "ImageAvailability", "check_statistics"]

log = logging.getLogger(__name__)


def check_statistics(stats: Mapping[str, Tensor], layers: Mapping[str, int], num_classes: int) -> dict[str, str | None]:
    """Per concept layer: None when its statistics fit the model, else a sentence saying why not.

    Args:
        stats: the tensors of ``concept_stats.safetensors`` (``<layer>/<statistic>``).
        layers: concept layer name → its dictionary size ``K``.
        num_classes: the model's class count.
    """
    problems: dict[str, str | None] = {}
    for layer, k in layers.items():
        expected = {
            "frequency": (k,),
            "class_mean_contributions": (num_classes, k),
            "top_indices": (k, None),
            "top_activations": (k, None),
        }
        problem = None
        for name, shape in expected.items():
            tensor = stats.get(f"{layer}/{name}")
            if tensor is None:
                problem = f"the concept statistics have no {name!r} for layer {layer!r} (computed for another model?)"
                break
            got = tuple(tensor.shape)
            if len(got) != len(shape) or any(
                want is not None and want != g for want, g in zip(shape, got, strict=True)
            ):
                problem = (
                    f"the concept statistics of layer {layer!r} do not fit this model: {name} has shape "
                    f"{list(got)}, expected {[s if s is not None else 'T' for s in shape]} (K = {k}, "
                    f"{num_classes} classes); they are stale: rerun `fact stats`"
                )
                break
        problems[layer] = problem
    return problems


@dataclass(frozen=True)
class ImageAvailability:
    """Whether a card's dataset images could be shown, as the card reports it (``example_images``)."""

    available: bool
    reason: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"available": self.available, "reason": self.reason, "message": self.message}


@dataclass
class ExampleImages:
    """The statistics' dataset images by position in their split (``concept_stats.json``'s ``data``).

    The split is reopened with :func:`fact_model.data.sources.open_recorded_split` (the
    embedded dataset is regenerated; a folder is listed, once, on the first card that needs
    it) and images are read one by one, so one unreadable file costs only its own example.

    Args:
        description: the statistics' ``data`` entry (``{"dataset": "synthetic", …}`` or
            ``{"dataset": "image_folder", "root": …, "split": …}``), or None.
        class_names: the served model's class names (a folder must still hold these classes).
    """

    description: Mapping[str, Any] | None
    class_names: tuple[str, ...]
    _split: Any = field(default=None, init=False, repr=False)
    _problem: ImageAvailability | None = field(default=None, init=False, repr=False)

    def get(self, positions: list[int]) -> tuple[list[Image.Image | None], ImageAvailability]:
        """``(images, availability)``: one RGB image (None where that one failed) per position, or all None and why."""
        none: list[Image.Image | None] = [None] * len(positions)
        if self._split is None and self._problem is None:
            self._problem = self._open()
        if self._problem is not None:
            return none, self._problem
        split = self._split
        if positions and max(positions) >= len(split):
            return none, ImageAvailability(
                False,
                "dataset_changed",
                f"the statistics' split now has {len(split)} images, fewer than their index {max(positions)}: "
                "the dataset changed since `fact stats`; rerun it",
            )
        images: list[Image.Image | None] = []
        failed = []
        for position in positions:
            try:
                pixels = split.images([position])[0]  # uint8 (3, S, S), the recorded preprocessing
                images.append(Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()))
            except (ValueError, OSError) as err:
                images.append(None)
                failed.append(str(err))
        if failed:
            return images, ImageAvailability(
                True, "some_images_unreadable", f"{len(failed)} image(s) could not be read: {'; '.join(failed[:3])}"
            )
        return images, ImageAvailability(True)

    def _open(self) -> ImageAvailability | None:
        """Reopen the recorded split (once); None when it can serve the statistics' positions, else why not."""
        from fact_model.data.sources import open_recorded_split

        if not self.description or not self.description.get("dataset"):
            return ImageAvailability(
                False,
                "dataset_unknown",
                "the concept statistics record no dataset to read their images from; the card's numbers are from "
                "the statistics (recompute them with `fact stats` to get images)",
            )
        try:
            split = open_recorded_split(dict(self.description))
        except (KeyError, TypeError, ValueError, OSError) as err:  # remembered: the folder is not listed again
            log.warning("concept card images unavailable: %s", err)
            return ImageAvailability(
                False,
                "dataset_unreadable",
                f"the statistics' dataset images cannot be read on this machine ({err}); the card's numbers are "
                "from the statistics",
            )
        if tuple(split.class_names) != tuple(self.class_names):
            return ImageAvailability(
                False,
                "dataset_changed",
                f"the statistics' dataset now holds other classes than the model ({len(split.class_names)} vs "
                f"{len(self.class_names)}): it changed since `fact stats`",
            )
        self._split = split
        return None
