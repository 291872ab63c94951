"""Datasets for training and checking concept explanations.

* :mod:`fact_model.data.synthetic` — seeded images of classes made of shared parts,
  with a ground-truth part map per pixel (known concepts); re-exported here.
"""

from fact_model.data.synthetic import (
    CLASS_NAMES,
    CLASS_PARTS,
    DISTRACTOR_TYPES,
    NUM_CLASSES,
    PART_NAMES,
    PART_TYPES,
    SPLITS,
    SyntheticConfig,
    SyntheticParts,
    part_map_to_rgb,
    render_sample,
)

__all__ = [
    "CLASS_NAMES",
    "CLASS_PARTS",
    "DISTRACTOR_TYPES",
    "NUM_CLASSES",
    "PART_NAMES",
    "PART_TYPES",
    "SPLITS",
    "SyntheticConfig",
    "SyntheticParts",
    "part_map_to_rgb",
    "render_sample",
]
