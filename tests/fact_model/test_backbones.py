"""Backbones: registry, staged forward, and parity with the ``bcos`` package's whole models."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fact_model.backbones import create_backbone, list_backbones, load_bcos_v2_checkpoint, register_backbone
from fact_model.bcos import explanation_mode
from tests.conftest import randomise_norm_statistics

bcos_models = pytest.importorskip("bcos.models")
from bcos.modules import BcosConv2d as TheirBcosConv2d  # noqa: E402
from bcos.modules import norms as their_norms  # noqa: E402


def test_registry_lists_and_rejects():
    names = list_backbones()
    for required in ("bcos_resnet8", "bcos_resnet14", "bcos_resnet20", "bcos_v2_resnet50", "bcos_v2_densenet121"):
        assert required in names
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'.*bcos_resnet8"):
        create_backbone("resnet9000")
    with pytest.raises(ValueError, match="invalid arguments"):
        create_backbone("bcos_resnet8", not_an_argument=1)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("bcos_resnet8")(lambda: None)


def _their_long_model(name: str, num_classes: int):
    """A B-cos-v2 "long" model exactly as the bcos package builds it (BNU-linear norms, B=2)."""
    builder = getattr(bcos_models, name)
    return builder(
        num_classes=num_classes,
        norm_layer=their_norms.NoBias(their_norms.BatchNormUncentered2d),
        conv_layer=partial(TheirBcosConv2d, b=2, max_out=1),
        logit_bias=-4.0,
    )


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_imagenet_models_equal_bcos_package(name, tmp_path):
    torch.manual_seed(0)
    theirs = _their_long_model(name, num_classes=20)
    randomise_norm_statistics(theirs, torch.Generator().manual_seed(0))
    theirs.eval()
    checkpoint = tmp_path / f"{name}_long.pth"
    torch.save(theirs.state_dict(), checkpoint)

    ours = create_backbone(f"bcos_v2_{name}", num_classes=20, logit_bias=-4.0)
    load_bcos_v2_checkpoint(ours, checkpoint)  # strict=True inside
    ours.eval()
    x6 = torch.cat([x := torch.rand(2, 3, 64, 64), 1 - x], dim=1)
    with torch.no_grad():
        expected = theirs(x6)
        torch.testing.assert_close(ours(x6), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.net(x6), expected, rtol=1e-4, atol=1e-5)
    # Explanation mode is a forward no-op on the whole model.
    with explanation_mode(ours), torch.no_grad():
        assert torch.equal(ours(x6), ours.net(x6))


def test_checkpoint_mismatch_is_a_clear_error(tmp_path):
    small = create_backbone("bcos_resnet8", num_classes=5)
    checkpoint = tmp_path / "small.pth"
    torch.save(small.net.state_dict(), checkpoint)
    other = create_backbone("bcos_resnet14", num_classes=5)
    with pytest.raises(ValueError, match="does not match architecture bcos_resnet14"):
        load_bcos_v2_checkpoint(other, checkpoint)
    with pytest.raises(FileNotFoundError) as info:
        load_bcos_v2_checkpoint(other, tmp_path / "missing.pth")
    assert str(info.value) == f"checkpoint not found: {tmp_path / 'missing.pth'}"


@pytest.mark.parametrize("name", ["bcos_resnet8", "bcos_resnet14", "bcos_resnet20"])
@pytest.mark.parametrize("small_inputs", [True, False])
def test_small_family_stages_reproduce_the_network(name, small_inputs):
    torch.manual_seed(0)
    backbone = create_backbone(name, num_classes=7, width=8, small_inputs=small_inputs).eval()
    randomise_norm_statistics(backbone, torch.Generator().manual_seed(1))
    x6 = torch.rand(3, 6, 32, 32)
    with torch.no_grad():
        h = x6
        for stage_name, stage in backbone.stages:
            h = stage(h)
            assert h.shape[1] == backbone.stage_channels(stage_name)
        assert torch.equal(backbone(x6), backbone.net(x6))
    assert backbone.stage_names[-1] == "layer3"
    assert not any(k.startswith("_") for k in backbone.state_dict())  # no duplicated registrations


def test_densenet_stage_channels():
    backbone = create_backbone("bcos_v2_densenet121", num_classes=10)
    assert backbone.stage_channels("features.transition2") == 256
    assert backbone.stage_channels("features.transition3") == 512
    assert backbone.stage_channels("features.norm5") == 1024
    with pytest.raises(ValueError, match="unknown stage"):
        backbone.stage_channels("features.nope")
