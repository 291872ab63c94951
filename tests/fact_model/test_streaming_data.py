"""The streamed data path: memory independent of dataset size, split layouts, resumable feature collection."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fact_model.artifacts import save
from fact_model.cli import main
from fact_model.config import ConceptLayerSpec, FaCTConfig, Preprocessing
from fact_model.data.loading import ImageSplit, shuffled_order
from fact_model.data.sources import DataSpec, open_recorded_split, open_split, open_training_data
from fact_model.model import FaCTModel
from fact_model.training import features as features_module
from fact_model.training.features import collect_features
from tests._support.folders import CLASSES, write_image_folder

REPO = Path(__file__).resolve().parents[2]


def _narrow_model(size: int, classes: tuple[str, ...] = CLASSES) -> FaCTModel:
    """A random, very narrow FaCT model (ImageNet-style stem: 16× fewer positions than the input)."""
    torch.manual_seed(0)
    config = FaCTConfig(
        backbone="bcos_resnet8",
        backbone_kwargs={"width": 4, "small_inputs": False},
        class_names=classes,
        preprocessing=Preprocessing(size),
        concept_layers=(ConceptLayerSpec("layer3", 32, 4),),
        output_activation="sigmoid",
    )
    return FaCTModel(config).eval()


_PEAK = (
    "import resource, sys\n"
    "from fact_model.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def _peak_kb(*args: str) -> int:
    """Peak resident memory (kB) of one ``fact`` command run in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, "-q", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.rsplit("PEAK_KB", 1)[1].split()[0])


@pytest.mark.slow  # evaluate and stats over a 60- and a 600-image folder at 224² (~35 s)
def test_memory_of_evaluate_and_stats_does_not_grow_with_the_folder(tmp_path):
    """N images at 224² decoded would take N·147 kB; the peak may not grow by a tenth of the extra images' share."""
    size, n = 224, 600
    model = _narrow_model(size)
    folders = {
        "small": write_image_folder(tmp_path / "small", n // 10, size),
        "big": write_image_folder(tmp_path / "big", n, size),
    }
    runs = {}
    for command in ("evaluate", "stats"):
        for name, folder in folders.items():
            artifact = tmp_path / f"model_{command}_{name}"
            save(model, artifact)
            args = [command, "--model", str(artifact), "--data", str(folder), "--image-size", str(size)]
            args += ["--workers", "0", "--batch-size", "8"]
            args += ["--out", str(tmp_path / f"eval_{name}")] if command == "evaluate" else []
            runs[command, name] = args
    with ThreadPoolExecutor(max_workers=2) as pool:  # two processes at a time: one per core
        figures = dict(zip(runs, pool.map(lambda args: _peak_kb(*args), runs.values()), strict=True))
    extra_decoded_kb = (n - n // 10) * 3 * size * size / 1024
    for command in ("evaluate", "stats"):
        growth = figures[command, "big"] - figures[command, "small"]
        assert growth < extra_decoded_kb / 10, (
            f"fact {command}: peak RSS {figures[command, 'small']} kB on {n // 10} images, "
            f"{figures[command, 'big']} kB on {n}: grew by {growth} kB, limit {extra_decoded_kb / 10:.0f} kB"
        )
    report = json.loads((tmp_path / "eval_big" / "evaluation.json").read_text())
    assert report["images"] == n


def _split_layout(root: Path, size: int = 32) -> Path:
    write_image_folder(root / "train", 24, size, seed=1)
    write_image_folder(root / "val", 8, size, seed=2)
    write_image_folder(root / "test", 6, size, seed=3)
    return root


def test_imagenet_split_layout_and_val_data(tmp_path):
    root = _split_layout(tmp_path / "imagenet")
    spec = DataSpec(source=str(root), image_size=32, workers=0)
    assert spec.layout() == "splits" and spec.splits() == ("train", "val", "test")
    data = open_training_data(spec)
    assert (len(data.train), len(data.val)) == (24, 8)  # the folders themselves, not a seeded split of train
    assert data.class_names == CLASSES
    train_files = {data.train.item_name(i) for i in range(len(data.train))}
    assert all("/train/" in f for f in train_files)
    assert len(open_split(spec, "test")) == 6

    other_val = write_image_folder(tmp_path / "other_val", 4, 32, seed=4)
    with_val = DataSpec(source=str(root), image_size=32, val_source=str(other_val), workers=0)
    assert len(open_training_data(with_val).val) == 4
    assert open_training_data(with_val).val.item_name(0).startswith(str(other_val))

    # A classes-layout folder with --val-data: the whole folder trains, the other one validates.
    flat = DataSpec(source=str(root / "train"), image_size=32, val_source=str(other_val), workers=0)
    flat_data = open_training_data(flat)
    assert flat.layout() == "classes" and (len(flat_data.train), len(flat_data.val)) == (24, 4)

    wrong = write_image_folder(tmp_path / "wrong_val", 4, 32, classes=("ants", "wasps"))
    with pytest.raises(ValueError, match="differ"):
        open_training_data(DataSpec(source=str(root), image_size=32, val_source=str(wrong)))
    with pytest.raises(ValueError, match=r"has splits \['train', 'val', 'test'\], got 'all'"):
        open_split(spec, "all")

    # fact evaluate picks the test folder by default, and --split val on request.
    artifact = tmp_path / "model"
    save(_narrow_model(32), artifact)
    for split, images in ((None, 6), ("val", 8)):
        args = ["-q", "evaluate", "--model", str(artifact), "--data", str(root), "--image-size", "32"]
        args += ["--workers", "0", "--out", str(tmp_path / f"eval_{split}")] + (["--split", split] if split else [])
        assert main(args) == 0
        report = json.loads((tmp_path / f"eval_{split}" / "evaluation.json").read_text())
        assert report["images"] == images and report["data"]["split"] == (split or "test")
        assert len(open_recorded_split(report["data"])) == images  # the description reopens the same split


def test_evaluate_on_a_folder_of_other_classes_is_refused(tmp_path, caplog):
    artifact = tmp_path / "model"
    save(_narrow_model(32), artifact)
    folder = write_image_folder(tmp_path / "cats", 4, 32, classes=("cats", "dogs"))
    args = ["-q", "evaluate", "--model", str(artifact), "--data", str(folder), "--image-size", "32"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "are not the model's" in caplog.text and not (tmp_path / "out").exists()


def test_loader_order_is_seeded_and_batches_are_bounded(tmp_path):
    images = torch.arange(10, dtype=torch.uint8)[:, None, None, None].expand(10, 3, 8, 8).contiguous()
    split = ImageSplit.from_tensors(images, torch.arange(10) % 2, CLASSES)
    order = shuffled_order(10, seed=3, epoch=1)
    assert order == shuffled_order(10, seed=3, epoch=1) != shuffled_order(10, seed=3, epoch=2)
    batches = list(split.batches(4, order=order))
    assert [len(b) for b in batches] == [4, 4, 2]
    seen = torch.cat([b.indices for b in batches]).tolist()
    assert seen == order
    assert torch.cat([b.images[:, 0, 0, 0] for b in batches]).tolist() == order  # image i holds the value i
    assert [b.indices.tolist() for b in split.batches(4, order=order, start_batch=2)] == [order[8:]]
    with pytest.raises(ValueError, match="streamed from disk"):
        open_split(DataSpec(source=str(write_image_folder(tmp_path / "f", 4, 16)), image_size=16), "all").materialise()


def _collection_split(tmp_path: Path) -> tuple[FaCTModel, ImageSplit]:
    folder = write_image_folder(tmp_path / "images", 40, 32)
    return _narrow_model(32), open_split(DataSpec(source=str(folder), image_size=32, workers=0), "all")


def _shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*.safetensors"))}


def test_interrupted_collection_resumes_to_the_same_shards(tmp_path, monkeypatch):
    model, split = _collection_split(tmp_path)
    kwargs = {"positions_per_image": 4, "batch_size": 4, "shard_rows": 32, "progress": False}
    reference = collect_features(model, split, "layer2", tmp_path / "reference", **kwargs)
    assert reference.count == 40 * 4 and reference.sizes == (32,) * 5  # 16 rows per batch: a shard every 2 batches

    real = features_module.position_contributions
    calls = {"n": 0}

    def crash_at_batch_8(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated crash mid-collection")
        return real(*args, **kw)

    monkeypatch.setattr(features_module, "position_contributions", crash_at_batch_8)
    with pytest.raises(KeyboardInterrupt):
        collect_features(model, split, "layer2", tmp_path / "resumed", **kwargs)
    records = sorted(p.name for p in (tmp_path / "resumed").glob("shard_*.json"))
    assert records == ["shard_00000.json", "shard_00001.json", "shard_00002.json"]  # complete before the crash
    assert not (tmp_path / "resumed" / "done.json").exists()

    resumed_calls = {"n": 0}

    def counted(*args, **kw):
        resumed_calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(features_module, "position_contributions", counted)
    resumed = collect_features(model, split, "layer2", tmp_path / "resumed", **kwargs)
    assert resumed_calls["n"] == 10 - 6  # only the batches after the last complete shard were computed again
    assert _shard_bytes(tmp_path / "resumed") == _shard_bytes(tmp_path / "reference")
    assert resumed.count == reference.count


@pytest.mark.slow  # collects the shards twice
def test_torn_shard_is_detected_and_redone(tmp_path):
    model, split = _collection_split(tmp_path)
    kwargs = {"positions_per_image": 4, "batch_size": 4, "shard_rows": 32, "progress": False}
    reference = _shard_bytes(collect_features(model, split, "layer2", tmp_path / "reference", **kwargs).directory)
    out = tmp_path / "torn"
    collect_features(model, split, "layer2", out, **kwargs)
    # Turn the finished collection back into an interrupted one: the last two shards unrecorded, the second torn.
    (out / "done.json").unlink()
    for index in (3, 4):
        (out / f"shard_{index:05d}.json").unlink()
    second = out / "shard_00001.safetensors"
    second.write_bytes(second.read_bytes()[:-40])
    (out / ".shard_00004.safetensors.tmp").write_bytes(b"half a shard")  # a write cut short
    collect_features(model, split, "layer2", out, **kwargs)
    assert _shard_bytes(out) == reference


def test_shard_batches_cover_every_vector_once_with_a_bounded_buffer(tmp_path):
    model, split = _collection_split(tmp_path)
    shards = collect_features(
        model, split, "layer2", tmp_path / "f16", positions_per_image=4, batch_size=4, shard_rows=32,
        dtype="float16", progress=False,
    )  # fmt: skip
    stored = torch.cat(list(shards.iterate()))
    assert stored.dtype == torch.float32 and len(stored) == 160
    batches = list(shards.batches(32, torch.Generator().manual_seed(0), buffer_shards=2))
    assert [len(b) for b in batches] == [32] * 5 and len(batches) == shards.steps(32)
    seen = torch.cat(batches)
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, stored.tolist()))  # every vector exactly once
    assert not torch.equal(seen, stored)  # shuffled
    assert json.loads((shards.directory / "done.json").read_text())["dtype"] == "float16"
    assert shards.paths[0].stat().st_size < 32 * shards.dim * 2 + 200  # stored as 2 bytes per value


def test_evaluate_and_stats_read_at_the_models_resolution_by_default(tmp_path):
    """Without --image-size a command reads the data at the model's own preprocessing, not a fixed default."""
    artifact = tmp_path / "model"
    save(_narrow_model(40), artifact)
    folder = write_image_folder(tmp_path / "folder", 6, 64)
    args = ["--model", str(artifact), "--data", str(folder), "--workers", "0"]
    assert main(["-q", "evaluate", *args, "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["data"]["image_size"] == 40
    assert main(["-q", "stats", *args]) == 0
    assert json.loads((artifact / "concept_stats.json").read_text())["data"]["image_size"] == 40
