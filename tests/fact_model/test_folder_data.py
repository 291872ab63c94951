"""User image folders: loading, bad-file handling, PNG export round trip and the stratified split."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from fact_model.config import Preprocessing
from fact_model.data.export import export_png_folder, safe_folder_name
from fact_model.data.folder import ImageFolderDataset, split_indices

RECIPE = Preprocessing(16)
FOLDER_LOGGER = "fact_model.data.folder"


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
    return Image.fromarray(pixels.numpy())


def _save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def mixed_root(tmp_path: Path) -> Path:
    """3 classes, 7 images of assorted modes, sizes and formats, plus files that must be ignored."""
    root = tmp_path / "data"
    _save(Image.new("L", (40, 20), 128), root / "cat" / "a.png")
    palette = Image.new("P", (9, 33))
    palette.putpalette([0, 255, 0] * 256)
    _save(palette, root / "cat" / "nested" / "b.png")
    rgba = Image.new("RGBA", (24, 24), (255, 0, 0, 0))  # fully transparent → white
    _save(rgba, root / "dog" / "c.PNG")
    _save(_noise((50, 31), 1), root / "dog" / "d.jpg", quality=90)
    _save(Image.new("RGB", (17, 17), (0, 0, 255)), root / "emu" / "e.webp", lossless=True)
    _save(Image.new("RGB", (16, 16), (10, 20, 30)), root / "emu" / "f.bmp")
    _save(Image.new("RGB", (16, 16)), root / "emu" / "g.jpeg")
    # ignored: hidden folder, hidden file, non-image extension, a top-level file
    _save(Image.new("RGB", (8, 8)), root / ".thumbnails" / "x.png")
    _save(Image.new("RGB", (8, 8)), root / "dog" / ".hidden.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")
    return root


def test_mixed_folder_loads_with_shapes_labels_and_class_order(mixed_root: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger=FOLDER_LOGGER):
        dataset = ImageFolderDataset(mixed_root, RECIPE)
    assert not caplog.records and dataset.skipped == []
    assert dataset.class_names == ["cat", "dog", "emu"]
    assert len(dataset) == 7
    names = [(path.relative_to(mixed_root).as_posix(), label) for path, label in dataset.samples]
    assert names == [
        ("cat/a.png", 0),
        ("cat/nested/b.png", 0),
        ("dog/c.PNG", 1),
        ("dog/d.jpg", 1),
        ("emu/e.webp", 2),
        ("emu/f.bmp", 2),
        ("emu/g.jpeg", 2),
    ]
    assert dataset.labels == [0, 0, 1, 1, 2, 2, 2]
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert label == dataset.samples[index][1]
    torch.testing.assert_close(dataset[0][0], torch.full((3, 16, 16), 128 / 255))  # greyscale → equal channels
    torch.testing.assert_close(dataset[1][0][:, 5, 5], torch.tensor([0.0, 1.0, 0.0]))  # palette → green
    torch.testing.assert_close(dataset[4][0][:, 8, 8], torch.tensor([0.0, 0.0, 1.0]))  # lossless WebP → blue
    torch.testing.assert_close(dataset[-2][0][:, 3, 3], torch.tensor([10, 20, 30]) / 255)  # BMP, negative index
    with pytest.raises(IndexError, match="out of range"):
        dataset[7]


def test_transparent_rgba_pixel_becomes_white(mixed_root: Path):
    dataset = ImageFolderDataset(mixed_root, RECIPE)
    image, label = dataset[2]
    assert dataset.class_names[label] == "dog"
    torch.testing.assert_close(image, torch.ones(3, 16, 16))


def test_gif_tiff_and_16_bit_files_are_read_by_value_range(tmp_path: Path):
    """The one format list of ``fact_model.image_io``: GIF and TIFF are collected too, and 16-bit or float
    files are scaled by their real range (a 16-bit PNG is not clipped to white)."""
    import numpy as np

    from fact_model import image_io
    from fact_model.data.folder import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == image_io.IMAGE_EXTENSIONS and {".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    root = tmp_path / "data"
    _save(Image.fromarray(np.full((12, 12), 16448, np.uint16)), root / "a" / "grey16.png")  # 16448 / 257 = 64
    _save(Image.fromarray(np.full((12, 12), 0.25, np.float32)), root / "a" / "float.tif")
    _save(Image.new("RGB", (12, 12), (0, 0, 255)).convert("P"), root / "b" / "blue.gif")
    _save(Image.new("RGB", (12, 12), (255, 0, 0)), root / "b" / "red.TIFF")
    dataset = ImageFolderDataset(root, RECIPE)
    assert dataset.skipped == [] and len(dataset) == 4
    by_name = {path.name: dataset[index][0][:, 8, 8] for index, (path, _) in enumerate(dataset.samples)}
    torch.testing.assert_close(by_name["grey16.png"], torch.full((3,), 64 / 255))
    torch.testing.assert_close(by_name["float.tif"], torch.full((3,), 64 / 255))  # round(0.25 · 255) = 64
    torch.testing.assert_close(by_name["blue.gif"], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(by_name["red.TIFF"], torch.tensor([1.0, 0.0, 0.0]))


def test_files_whose_content_or_mode_cannot_be_read_are_skipped_saying_why(tmp_path: Path):
    import numpy as np

    root = tmp_path / "data"
    _save(Image.new("RGB", (8, 8)), root / "a" / "ok.png")
    _save(Image.new("RGB", (8, 8)), root / "a" / "icon.png", format="ICO")  # the extension lies
    _save(Image.new("RGB", (8, 8)), root / "b" / "ok.png")
    _save(Image.fromarray(np.full((8, 8), 3.0, np.float32)), root / "b" / "float.tif")
    dataset = ImageFolderDataset(root, RECIPE)
    reasons = {path.name: reason for path, reason in dataset.skipped}
    assert set(reasons) == {"icon.png", "float.tif"} and len(dataset) == 2
    assert "image format ICO is not accepted; send one of JPEG, PNG, WebP, GIF, BMP, TIFF" in reasons["icon.png"]
    assert "float images are read as intensities in [0, 1]" in reasons["float.tif"]


def test_bad_files_are_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "data"
    for i in range(3):
        _save(_noise((12, 12), i), root / "ant" / f"good{i}.png")
        _save(_noise((12, 12), 10 + i), root / "bee" / f"good{i}.png")
    bad = {
        root / "ant" / "random.jpg": torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes(),
        root / "ant" / "truncated.png": _png_bytes(_noise((32, 32), 5))[:600],
        root / "bee" / "text.png": b"this is plainly not a PNG file\n",
    }
    jpeg = io.BytesIO()
    _noise((64, 64), 6).save(jpeg, format="JPEG", quality=95)
    bad[root / "bee" / "truncated.jpg"] = jpeg.getvalue()[: len(jpeg.getvalue()) * 3 // 5]  # verify() alone misses
    for path, data in bad.items():
        path.write_bytes(data)

    with caplog.at_level(logging.WARNING, logger=FOLDER_LOGGER):
        dataset = ImageFolderDataset(root, RECIPE)
    warnings = [r for r in caplog.records if r.name == FOLDER_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 4 unreadable" in message
    assert all(str(path) in message for path in bad)
    assert len(dataset.skipped) == 4 and {path for path, _ in dataset.skipped} == set(bad)
    assert all(reason for _, reason in dataset.skipped)
    assert len(dataset) == 6 and all(path.name.startswith("good") for path, _ in dataset.samples)
    assert [dataset[i][0].shape for i in range(6)] == [(3, 16, 16)] * 6


def test_warning_lists_at_most_five_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "data"
    _save(_noise((8, 8), 0), root / "a" / "ok.png")
    _save(_noise((8, 8), 1), root / "b" / "ok.png")
    for i in range(7):
        (root / "a" / f"bad{i}.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger=FOLDER_LOGGER):
        dataset = ImageFolderDataset(root, RECIPE)
    message = caplog.records[-1].getMessage()
    assert len(dataset.skipped) == 7 and "skipped 7" in message
    assert sum(f"bad{i}.png" in message for i in range(7)) == 5 and "and 2 more" in message


def test_load_time_failure_falls_back_to_next_item(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "data"
    _save(Image.new("RGB", (16, 16), (255, 0, 0)), root / "a" / "0.png")
    (root / "a" / "1.png").write_bytes(b"corrupt")
    _save(Image.new("RGB", (16, 16), (0, 255, 0)), root / "b" / "2.png")
    dataset = ImageFolderDataset(root, RECIPE, validate=False)  # bad file not noticed up front
    assert len(dataset) == 3 and dataset.skipped == []
    with caplog.at_level(logging.WARNING, logger=FOLDER_LOGGER):
        image, label = dataset[1]
    assert label == 1 and torch.equal(image[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # item 2 instead
    assert "1.png" in caplog.text and len(dataset.skipped) == 1
    assert dataset[1][1] == 1  # same answer again: deterministic


def test_nothing_loadable_raises(tmp_path: Path):
    root = tmp_path / "data"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 2 image files .* could be read"):
        ImageFolderDataset(root, RECIPE)
    dataset = ImageFolderDataset(root, RECIPE, validate=False)
    with pytest.raises(RuntimeError, match="none of the 2 image files .* could be loaded"):
        dataset[0]


def test_class_whose_files_are_all_bad_raises(tmp_path: Path):
    root = tmp_path / "data"
    _save(_noise((8, 8), 0), root / "a" / "ok.png")
    (root / "b").mkdir()
    (root / "b" / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"class folder '.*b' has no readable images \(all 1 file"):
        ImageFolderDataset(root, RECIPE)


def test_missing_root_and_non_directory_raise(tmp_path: Path):
    with pytest.raises(ValueError, match=r"dataset root '.*nowhere' does not exist"):
        ImageFolderDataset(tmp_path / "nowhere", RECIPE)
    file = tmp_path / "file.png"
    _save(Image.new("RGB", (8, 8)), file)
    with pytest.raises(ValueError, match="is not a directory"):
        ImageFolderDataset(file, RECIPE)


def test_empty_root_raises(tmp_path: Path):
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    (tmp_path / "loose.png").write_bytes(_png_bytes(Image.new("RGB", (8, 8))))
    with pytest.raises(ValueError, match="has no class sub-folders; expected one sub-folder per class"):
        ImageFolderDataset(tmp_path, RECIPE)


def test_single_class_raises(tmp_path: Path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "cats" / "a.png")
    with pytest.raises(ValueError, match="a classifier needs at least 2 classes; found 1: 'cats'"):
        ImageFolderDataset(tmp_path, RECIPE)


def test_class_folder_without_images_raises(tmp_path: Path):
    _save(Image.new("RGB", (8, 8)), tmp_path / "cats" / "a.png")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder '.*dogs' contains no image files"):
        ImageFolderDataset(tmp_path, RECIPE)


def test_no_images_anywhere_raises(tmp_path: Path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    with pytest.raises(ValueError, match="no image files .* in any of its 2 class folders"):
        ImageFolderDataset(tmp_path, RECIPE)


def test_bad_recipe_raises(mixed_root: Path):
    with pytest.raises(ValueError, match="recipe must be a fact_model.config.Preprocessing, got int"):
        ImageFolderDataset(mixed_root, 16)  # type: ignore[arg-type]


CLASS_NAMES = ["red disc + blue square", "zebra/stripes", "Äpfel", "alpha"]  # unsorted on purpose


def _labelled_batch(n: int = 12, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % len(CLASS_NAMES)
    return images, labels


def test_preprocessing_at_native_size_is_exact():
    pixels = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    from fact_model.preprocessing import preprocess_images

    assert torch.equal(preprocess_images(image, Preprocessing(16))[0], pixels.float() / 255)


@pytest.mark.parametrize("as_float", [False, True])
def test_export_round_trip_is_exact(tmp_path: Path, as_float: bool):
    images, labels = _labelled_batch()
    source = images.float() / 255 if as_float else images
    counts = export_png_folder(source, labels, CLASS_NAMES, tmp_path / "out")
    assert counts == dict.fromkeys(CLASS_NAMES, 3) and list(counts) == CLASS_NAMES

    folders = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert folders[0] == "00_red_disc_+_blue_square" and folders[1].startswith("01_zebra")
    assert all("/" not in f and " " not in f for f in folders)
    mapping = json.loads((tmp_path / "out" / "classes.json").read_text(encoding="utf-8"))
    assert mapping == {"class_names": CLASS_NAMES, "folders": folders}
    assert not list((tmp_path / "out").rglob(".*"))  # no temp files left behind

    dataset = ImageFolderDataset(tmp_path / "out", Preprocessing(16))
    assert dataset.class_names == CLASS_NAMES
    assert len(dataset) == len(images)
    for path, label in dataset.samples:
        index = int(path.stem)
        image, loaded_label = dataset[dataset.samples.index((path, label))]
        assert loaded_label == labels[index].item()
        assert torch.equal(image, images[index].float() / 255)


def test_export_refuses_non_empty_dir_unless_overwrite(tmp_path: Path):
    images, labels = _labelled_batch()
    out = tmp_path / "out"
    out.mkdir()
    unrelated = out / "keep_me.txt"
    unrelated.write_text("user data")
    with pytest.raises(ValueError, match=r"out_dir '.*out' is not empty; pass overwrite=True"):
        export_png_folder(images, labels, CLASS_NAMES, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep_me.txt"]  # nothing written

    export_png_folder(images, labels, CLASS_NAMES, out, overwrite=True)
    # a smaller second export replaces the first one's PNGs, keeps unrelated files
    counts = export_png_folder(images[:8], labels[:8], CLASS_NAMES, out, overwrite=True)
    assert counts == dict.fromkeys(CLASS_NAMES, 2)
    assert unrelated.read_text() == "user data"
    assert len(list(out.rglob("*.png"))) == 8
    assert len(ImageFolderDataset(out, Preprocessing(16))) == 8


def test_export_validates_inputs(tmp_path: Path):
    images, labels = _labelled_batch()
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\), got \(3, 16, 16\)"):
        export_png_folder(images[0], labels[:1], CLASS_NAMES, tmp_path / "a")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) for 4 class names, got 9"):
        export_png_folder(images, labels.clone().index_fill_(0, torch.tensor([2]), 9), CLASS_NAMES, tmp_path / "b")
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]"):
        export_png_folder(images.float(), labels, CLASS_NAMES, tmp_path / "c")
    with pytest.raises(ValueError, match=r"labels must have shape \(12,\)"):
        export_png_folder(images, labels[:5], CLASS_NAMES, tmp_path / "d")
    with pytest.raises(ValueError, match=r"class_names must be unique, got duplicates \['a'\]"):
        export_png_folder(images, labels, ["a", "a", "b", "c"], tmp_path / "e")


def test_safe_folder_name():
    assert safe_folder_name(3, "red disc + blue square", 12) == "03_red_disc_+_blue_square"
    assert safe_folder_name(0, "../..", 2) == "00_class"
    assert safe_folder_name(7, "a/b\\c:d", 200) == "007_a_b_c_d"


def test_split_indices_is_stratified_disjoint_complete_and_deterministic():
    labels = [0] * 10 + [1] * 20 + [2] * 5 + [3]
    train, val = split_indices(labels, 0.2, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(len(labels)))
    per_class_val = [sum(labels[i] == c for i in val) for c in range(4)]
    assert per_class_val == [2, 4, 1, 0]  # 20% per class; a single-item class stays in training
    assert split_indices(labels, 0.2, seed=0) == (train, val)
    assert split_indices(torch.tensor(labels), 0.2, seed=0) == (train, val)
    assert any(split_indices(labels, 0.2, seed=s)[1] != val for s in range(1, 5))
    train_n, val_n = split_indices(10, 0.3, seed=1)
    assert len(val_n) == 3 and sorted(train_n + val_n) == list(range(10))
    with pytest.raises(ValueError, match="val_fraction must be in \\(0, 1\\), got 1.5"):
        split_indices(labels, 1.5, seed=0)
    with pytest.raises(ValueError, match="labels must be non-negative ints, got -1"):
        split_indices([0, -1], 0.5, seed=0)


def test_dataset_split_uses_its_labels(mixed_root: Path):
    dataset = ImageFolderDataset(mixed_root, RECIPE)
    train, val = dataset.split(0.5, seed=0)
    assert sorted(dataset.labels[i] for i in val) == [0, 1, 2, 2]  # half of each class (2, 2, 3 items), rounded up
    assert sorted(train + val) == list(range(len(dataset)))
