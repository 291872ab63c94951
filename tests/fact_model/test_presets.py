"""The paper's configurations as presets: every row names a real stage, and the CLI applies them."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from fact_model import cli
from fact_model.backbones import create_backbone
from fact_model.presets import PRESETS, get_preset, presets_table
from fact_model.training import concepts as concepts_module
from tests._support.folders import write_image_folder

SPEC_ROWS = {  # spec section 7, typed in from the specification
    "resnet50_long/layer4": ("bcos_v2_resnet50", 16384, 16),
    "resnet50_long/layer3": ("bcos_v2_resnet50", 16384, 32),
    "resnet50_long/layer2": ("bcos_v2_resnet50", 8192, 32),
    "densenet121_long/features.norm5": ("bcos_v2_densenet121", 16384, 16),
    "densenet121_long/features.transition3": ("bcos_v2_densenet121", 16384, 32),
    "densenet121_long/features.transition2": ("bcos_v2_densenet121", 8192, 32),
}


def test_presets_match_the_specification_and_name_real_stages():
    for name, (arch, num_concepts, k) in SPEC_ROWS.items():
        preset = get_preset(name)
        assert (preset.arch, preset.layer.num_concepts, preset.layer.k) == (arch, num_concepts, k)
    vit = [p for p in PRESETS.values() if p.name.startswith("vitc_s/")]
    assert [p.layer.layer for p in vit] == [f"transformer.encoder_{b}" for b in range(4, 11)]
    assert all(8192 <= p.layer.num_concepts <= 16384 and 32 <= p.layer.k <= 64 for p in vit)
    for arch in {p.arch for p in PRESETS.values()}:
        backbone = create_backbone(arch, num_classes=3)
        for preset in (p for p in PRESETS.values() if p.arch == arch):
            assert preset.layer.layer in backbone.stage_names, (preset.name, backbone.stage_names)
            assert preset.layer.num_concepts > backbone.stage_channels(preset.layer.layer)  # overcomplete
    assert all(p.preprocessing.input_size == 224 and p.preprocessing.resize == 256 for p in PRESETS.values())
    assert len(presets_table()) == len(PRESETS) == 6 + 7
    with pytest.raises(ValueError, match="unknown preset 'resnet18/layer4'; valid: resnet50_long/layer4"):
        get_preset("resnet18/layer4")


def test_cli_preset_sets_arch_layer_preprocessing_and_recipe(tmp_path, monkeypatch, capsys):
    assert cli.main(["train", "concepts", "--list-presets"]) == 0
    assert "densenet121_long/features.transition3" in capsys.readouterr().out

    checkpoint = tmp_path / "resnet50.safetensors"
    save_file(
        {k: v.contiguous() for k, v in create_backbone("bcos_v2_resnet50", num_classes=2).net.state_dict().items()},
        str(checkpoint),
    )
    folder = write_image_folder(tmp_path / "folder", 8, 64)
    seen = {}

    def capture(model, data, layers, config, run_dir, progress=True, **placement):
        seen.update(model=model, data=data, layers=layers, config=config)
        return model

    monkeypatch.setattr(concepts_module, "train_concepts", capture)
    args = ["-q", "train", "concepts", "--bcos-v2-checkpoint", str(checkpoint), "--data", str(folder)]
    args += ["--preset", "resnet50_long/layer4", "--epochs", "2", "--workers", "0", "--out", str(tmp_path / "run")]
    assert cli.main(args) == 0
    assert seen["model"].config.backbone == "bcos_v2_resnet50"
    assert [(s.layer, s.num_concepts, s.k) for s in seen["layers"]] == [("layer4", 16384, 16)]
    assert (seen["data"].preprocessing.input_size, seen["data"].preprocessing.resize) == (224, 256)
    config = seen["config"]
    assert (config.epochs, config.batch_size, config.aux_k, config.positions_per_image) == (2, 32768, 256, 36)
    assert seen["model"].config.output_activation == "sigmoid"

    wrong = [*args[:-2], "--arch", "bcos_v2_densenet121", "--out", str(tmp_path / "run2")]
    assert cli.main(wrong) == 2
    no_layer = ["-q", "train", "concepts", "--bcos-v2-checkpoint", str(checkpoint), "--arch", "bcos_v2_resnet50"]
    assert cli.main([*no_layer, "--out", str(tmp_path / "run3")]) == 2
