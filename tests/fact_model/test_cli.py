"""The ``fact`` command line: explain (table, JSON, maps), data export, error handling."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fact_model.cli import main
from tests.conftest import make_model

SERVICE_FIELDS = [
    "prediction", "top_classes", "target", "contrast", "explained", "logit_bias", "layer", "concepts", "other",
    "completeness", "active_concepts", "faithfulness",
]  # fmt: skip
"""The fields of an /explain response before ``model`` and ``timings_ms``, in order."""


@pytest.fixture
def artifact(tmp_path):
    import fact_model

    model = make_model([("layer2", 16, 2), ("layer3", 24, 4)])
    return fact_model.save(model, tmp_path / "model"), model


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, (mode, size) in enumerate([("RGB", (50, 40)), ("RGBA", (32, 32)), ("L", (20, 64))]):
        path = tmp_path / f"img{i}.png"
        Image.new(mode, size, 90 + 50 * i).save(path)
        paths.append(path)
    return paths


def test_explain_json_is_the_services_record_and_exact(artifact, image_files, capsys):
    """``fact explain --json`` prints the serialiser's record (the service's /explain fields) plus the image path."""
    path, model = artifact
    assert main(["-q", "explain", *map(str, image_files), "--model", str(path), "--json", "--top-k", "3"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    images = model.preprocess([Image.open(p) for p in image_files])
    with torch.no_grad():
        logits = model(images)  # independent of the explanation: a plain forward pass
    for n, record in enumerate(records):
        assert list(record) == ["image", *SERVICE_FIELDS]
        assert record["image"] == str(image_files[n])
        predicted = int(logits[n].argmax())
        assert record["prediction"]["index"] == predicted == record["target"]["index"]
        assert record["prediction"]["logit"] == pytest.approx(float(logits[n, predicted]), rel=1e-5, abs=1e-6)
        assert record["contrast"] is None and record["layer"] == "layer3"
        assert len(record["concepts"]) == 3
        assert all(c["layer"] == "layer3" and c["heatmap"] is None for c in record["concepts"])
        assert all(child["layer"] == "layer2" for c in record["concepts"] for child in c["children"])
        explained = float(logits[n, predicted]) - record["logit_bias"]
        assert record["explained"] == pytest.approx(explained, rel=1e-5, abs=1e-6)
        total = sum(c["contribution"] for c in record["concepts"]) + record["other"]["contribution"]
        assert total == pytest.approx(explained, rel=1e-4, abs=1e-6)
        assert record["completeness"]["residual"] < 1e-4 * max(1.0, abs(explained))


def test_explain_table_and_maps(artifact, image_files, tmp_path, capsys):
    path, _ = artifact
    out = tmp_path / "maps"
    assert main(["-q", "explain", str(image_files[0]), "--model", str(path), "--out", str(out), "--top-k", "2"]) == 0
    assert "completeness residual" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 3 and any("logit" in name for name in pngs)
    assert Image.open(out / pngs[0]).mode == "RGBA"


def test_explain_with_target_and_contrast_names(artifact, image_files, capsys):
    path, _ = artifact
    args = ["-q", "explain", str(image_files[0]), "--model", str(path), "--json", "--target", "class_2"]
    assert main([*args, "--contrast", "0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["target"] == {"index": 2, "name": "class_2"}
    assert record["contrast"] == {"index": 0, "name": "class_0"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["explain", "missing.png", "--model", "{model}"], "cannot read image"),
        (["explain", "{image}", "--model", "{tmp}/nope"], "artifact directory not found"),
        (["explain", "{image}", "--model", "{model}", "--target", "zebra"], "unknown target class name"),
        (["evaluate", "--model", "{model}", "--data", "{tmp}/nope", "--out", "{tmp}/e"], "does not exist"),
    ],
)
def test_errors_exit_2_with_a_message(artifact, image_files, tmp_path, caplog, args, message):
    path, _ = artifact
    filled = [a.format(model=path, image=image_files[0], tmp=tmp_path) for a in args]
    assert main(["-q", *filled]) == 2
    assert message in caplog.text


def test_data_export_writes_png_folders(tmp_path):
    out = tmp_path / "export"
    assert main(["-q", "data", "export", "--split", "test", "--n", "20", "--image-size", "32", "--out", str(out)]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 10 and sum(len(list(f.glob("*.png"))) for f in folders) == 20
    image = Image.open(next(folders[0].glob("*.png")))
    assert image.size == (32, 32)
    assert main(["-q", "data", "export", "--n", "5", "--image-size", "32", "--out", str(out)]) == 2  # not empty


def test_default_model_explains_an_exported_image(tmp_path, capsys):
    """The shipped default model classifies embedded test images it never saw."""
    from fact_model.artifacts import resolve_artifact_path

    try:
        resolve_artifact_path("default")
    except ValueError:
        pytest.skip("no default model shipped")
    out = tmp_path / "export"
    assert main(["-q", "data", "export", "--split", "test", "--n", "10", "--out", str(out)]) == 0
    files = sorted(str(p) for p in out.rglob("*.png"))
    assert main(["-q", "explain", *files, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    truth = {str(p): p.parent.name for p in out.rglob("*.png")}
    correct = sum(r["prediction"]["name"].replace(" ", "_") in truth[r["image"]] for r in records)
    assert correct >= 9
    assert all(r["completeness"]["residual"] < 1e-4 * max(1.0, abs(r["explained"])) for r in records)


def test_train_concepts_from_a_bcos_v2_checkpoint(tmp_path):
    """A local B-cos-v2 checkpoint (saved by the bcos package itself) replaces `fact train backbone`."""
    from functools import partial

    bcos_models = pytest.importorskip("bcos.models")
    from bcos.modules import BcosConv2d, norms

    torch = pytest.importorskip("torch")
    theirs = bcos_models.resnet18(
        num_classes=10,
        norm_layer=norms.NoBias(norms.BatchNormUncentered2d),
        conv_layer=partial(BcosConv2d, b=2, max_out=1),
    )
    torch.save(theirs.state_dict(), tmp_path / "resnet_18.pth")
    sizes = ["--image-size", "32", "--train-size", "40", "--val-size", "20", "--test-size", "20"]
    args = ["-q", "train", "concepts", *sizes, "--bcos-v2-checkpoint", str(tmp_path / "resnet_18.pth")]
    args += ["--arch", "bcos_v2_resnet18", "--layer", "layer4:16:2", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    from fact_model.artifacts import load

    model = load(tmp_path / "run" / "model")
    assert model.config.backbone == "bcos_v2_resnet18" and model.config.output_activation == "sigmoid"
    assert torch.equal(model.backbone.net.conv1.linear.weight, theirs.conv1.linear.weight)
    assert main([*args[:3], *sizes, "--bcos-v2-checkpoint", str(tmp_path / "resnet_18.pth"), "--layer", "layer4:16:2",
                 "--out", str(tmp_path / "run2")]) == 2  # no --arch: a clear error  # fmt: skip


def test_data_defaults_live_once():
    """The CLI does not copy the data defaults: without flags its DataSpec is DataSpec()'s, whose synthetic
    settings are SyntheticConfig()'s; a recorded description rebuilds the same SyntheticConfig."""
    from dataclasses import asdict

    from fact_model.cli import _data_spec, _parser
    from fact_model.data.sources import DataSpec
    from fact_model.data.synthetic import SyntheticConfig

    args = _parser().parse_args(["evaluate", "--out", "unused"])
    assert _data_spec(args) == DataSpec()
    assert DataSpec().synthetic_config() == SyntheticConfig()
    config = SyntheticConfig(image_size=32, seed=4, train=10, val=5, test=7, max_distractors=1)
    assert SyntheticConfig.from_description({"dataset": "synthetic", "split": "test", **asdict(config)}) == config
    given = _parser().parse_args(["evaluate", "--out", "u", "--train-size", "12", "--val-fraction", "0.3"])
    assert (_data_spec(given).train, _data_spec(given).val_fraction) == (12, 0.3)
