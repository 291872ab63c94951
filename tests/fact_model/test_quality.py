"""Concept quality on the shipped default model (small subset): ranges, exact attributions, the fact quality command."""

from __future__ import annotations

import json

import pytest
import torch

from fact_model.analysis.encoders import ColourTextureEncoder, OracleEncoder
from fact_model.analysis.quality import _attributions, concept_quality, plain_backbone, quality_markdown
from fact_model.artifacts import load, resolve_artifact_path
from fact_model.bcos.encoding import encode_rgb
from fact_model.cli import main
from fact_model.data.synthetic import CLASS_PARTS, PART_NAMES, SyntheticConfig, SyntheticParts


def _default_shipped() -> bool:
    try:
        resolve_artifact_path("default")
    except ValueError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _default_shipped(), reason="no default model shipped")


@pytest.fixture(scope="module")
def subset():
    images, _, part_maps = SyntheticParts(SyntheticConfig(test=80), "test").tensors()
    return load("default"), images, part_maps


def test_channel_attributions_are_exact_decompositions(subset):
    model, images, _ = subset
    plain = plain_backbone(model)
    x = images[:4].float() / 255
    with plain.explanation_mode(), torch.enable_grad():
        x6 = encode_rgb(x).requires_grad_(True)
        activation = plain.features_at(x6, "layer3")[:, 7].clamp(min=0).sum(dim=(1, 2))
        (grad,) = torch.autograd.grad(activation.sum(), x6)
        maps_unclipped = (x6 * grad).sum(dim=1)
    torch.testing.assert_close(maps_unclipped.flatten(1).sum(1), activation.detach(), rtol=1e-4, atol=1e-4)
    clipped = _attributions(plain, images[:4], "layer3", "channels", 7)
    torch.testing.assert_close(clipped, maps_unclipped.clamp(min=0))


@pytest.mark.slow  # the C² pipeline over the embedded dataset
def test_quality_report_ranges_and_markdown(subset):
    model, images, part_maps = subset
    encoders = [OracleEncoder(part_maps, len(PART_NAMES)), ColourTextureEncoder()]
    class_parts = sorted({p + 1 for parts in CLASS_PARTS for p in parts})
    reports = [
        concept_quality(model, images, "layer3", encoders, source, part_maps, PART_NAMES, class_parts, progress=False)
        for source in ("fact", "channels")
    ]
    for report in reports:
        assert report.scores and len(report.scores) + report.dead + report.dropped <= report.units
        for score in report.scores:
            assert 0 < score.purity <= 1 and 0 <= score.part < len(PART_NAMES)
            assert all(-1 - 1e-6 <= value <= 1 + 1e-6 for value in score.c2.values())
        assert 0 <= report.coverage <= 1
        for name in report.encoders:
            assert abs(report.random_c2[name]) < report.mean_c2(name)  # both layers' units beat a random concept
    text = quality_markdown(reports)
    assert "FaCT concepts" in text and "raw B-cos channels" in text and "random concept" in text
    assert "ground-truth oracle" in text and "built-in" in text
    json.dumps([r.to_dict() for r in reports])


@pytest.mark.slow  # the C² pipeline over the embedded dataset
def test_quality_command(tmp_path):
    out = tmp_path / "quality"
    assert main(["-q", "quality", "--test-size", "40", "--layer", "layer3", "--out", str(out)]) == 0
    data = json.loads((out / "quality.json").read_text())
    assert [(r["layer"], r["source"]) for r in data] == [("layer3", "fact"), ("layer3", "channels")]
    assert "## layer3" in (out / "quality.md").read_text()
    assert main(["-q", "quality", "--data", str(tmp_path), "--out", str(out)]) == 2  # needs ground truth


@pytest.mark.slow  # the C² pipeline over the embedded dataset
def test_report_command_writes_html_with_valid_images(tmp_path):
    import re

    from PIL import Image

    out = tmp_path / "report"
    assert main(["-q", "report", "--test-size", "60", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert any(name.startswith("gallery_") for name in images) and any(name.startswith("example_") for name in images)
    assert any(name.startswith("c2_histogram_") for name in images)
    for name in images:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert "FaCT concepts" in page and "raw B-cos channels" in page and "random concept, per class" in page
    assert "https://" not in page.replace("https://dl.fbaipublicfiles", "")  # nothing fetched when opened
