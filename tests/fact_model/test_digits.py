"""Real images through the folder path end to end: digits → backbone → concepts → evaluate → stats → serve."""

from __future__ import annotations

import json

import pytest

from benchmarks.digits import run
from fact_model.data.digits import export_digits
from fact_model.data.sources import DataSpec, open_split

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.slow,
]  # real scans through export, training and evaluation


def test_digits_export_is_an_imagenet_layout_of_real_scans(tmp_path):
    from sklearn.datasets import load_digits

    counts = export_digits(tmp_path / "d", size=16)
    assert counts == {"train": 1346, "test": 451} and sum(counts.values()) == len(load_digits().target)
    spec = DataSpec(source=str(tmp_path / "d"), image_size=16, workers=0)
    assert spec.layout() == "splits" and spec.splits() == ("train", "test")
    test = open_split(spec, "test")
    assert test.class_names == tuple(str(d) for d in range(10))
    per_class = [int((test.labels == c).sum()) for c in range(10)]
    assert min(per_class) >= 40  # stratified: every digit about a quarter of its scans
    # The ink of a scan survives the export: the darkest pixels of a digit are near 0, the paper white.
    image = next(iter(test.batches(8))).images[0].float()
    assert image.min() < 60 and image.max() > 240
    with pytest.raises(ValueError, match="not empty"):
        export_digits(tmp_path / "d", size=16)


def test_folder_path_end_to_end_on_real_digits(tmp_path):
    figures = run(tmp_path, fast=True, serve=True)
    assert figures["test_images"] == 451
    assert figures["backbone_test_accuracy"] > 0.8, figures  # chance 0.1; the full recipe reaches ≥ 97 %
    assert figures["fact_test_accuracy"] > figures["backbone_test_accuracy"] - 0.05, figures
    assert figures["max_relative_residual"] <= 1e-4
    assert figures["served_max_relative_residual"] <= 1e-4
    assert figures["served_accuracy"] >= 0.6, figures
    stats = json.loads((tmp_path / "concepts" / "model" / "concept_stats.json").read_text())
    assert stats["data"]["split"] == "test" and stats["data"]["dataset"] == "image_folder"
