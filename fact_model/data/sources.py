"""Where training and evaluation images come from: the embedded synthetic dataset or image folders.

A :class:`DataSpec` names the source; :func:`open_split` and :func:`open_training_data` turn it
into :class:`~fact_model.data.loading.ImageSplit` objects that are read batch by batch (nothing
decodes a whole folder up front). Folder layouts:

* **classes** — ``root/<class>/…``: splits ``train`` and ``val`` are a seeded, stratified split
  (``val_fraction`` of each class), ``all`` is every image;
* **splits** — ``root/train/<class>/…``, ``root/val/<class>/…`` (optionally ``root/test/<class>``),
  ImageNet's layout: each split is its own folder; recognised when the root's sub-folders are only
  ``train``/``val``/``test`` and ``train`` itself has sub-folders.

``val_source`` (``--val-data``) names a separate validation folder (classes layout, all of it),
which replaces the ``val`` split of either layout (a classes-layout root then trains on all of it).
Every split records a JSON description from which :func:`open_recorded_split` reopens it
(galleries, concept cards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fact_model.config import Preprocessing
from fact_model.data.folder import ImageFolderDataset, folder_class_names
from fact_model.data.loading import ImageSplit, TrainingData
from fact_model.data.synthetic import CLASS_NAMES, NUM_CLASSES, SPLITS, SyntheticConfig, SyntheticParts

__all__ = [
    "SYNTHETIC",
    "DataSpec",
    "folder_layout",
    "open_recorded_split",
    "open_split",
    "open_training_data",
]

SYNTHETIC = "synthetic"
SPLIT_FOLDERS = ("train", "val", "test")
_SYNTHETIC_DEFAULTS = SyntheticConfig()  # the embedded dataset's defaults live in SyntheticConfig only


@dataclass(frozen=True)
class DataSpec:
    """A data source.

    Attributes:
        source: ``"synthetic"`` (the embedded dataset) or the path of an image folder (either layout).
        image_size: model input size (synthetic: the generated size).
        seed: synthetic generation seed / folder train-val split seed.
        train, val, test: synthetic split sizes.
        val_fraction: classes layout: share of each class held out for validation.
        resize: folder preprocessing: shorter side before the centre crop (None: plain resize).
        val_source: a separate validation folder (one sub-folder per class), or None.
        workers: DataLoader worker processes for folders (None: one per spare core); not part of the
            data's identity (left out of :meth:`describe`).
    """

    source: str = SYNTHETIC
    image_size: int = _SYNTHETIC_DEFAULTS.image_size
    seed: int = _SYNTHETIC_DEFAULTS.seed
    train: int = _SYNTHETIC_DEFAULTS.train
    val: int = _SYNTHETIC_DEFAULTS.val
    test: int = _SYNTHETIC_DEFAULTS.test
    val_fraction: float = 0.1
    resize: int | None = None
    val_source: str | None = None
    workers: int | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(
            image_size=self.image_size, seed=self.seed, train=self.train, val=self.val, test=self.test
        )

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, resize=None if self.is_synthetic else self.resize)

    def layout(self) -> str:
        """``"synthetic"``, or the folder layout (``"classes"`` / ``"splits"``, see the module docstring)."""
        return SYNTHETIC if self.is_synthetic else folder_layout(Path(self.source))

    def splits(self) -> tuple[str, ...]:
        """The split names :func:`open_split` accepts for this source."""
        layout = self.layout()
        if layout == SYNTHETIC:
            return SPLITS
        if layout == "classes":
            return ("train", "val", "all")
        present = tuple(name for name in SPLIT_FOLDERS if (Path(self.source) / name).is_dir())
        return present if "val" in present or self.val_source is None else (*present, "val")

    def describe(self) -> dict[str, Any]:
        """JSON-able description for provenance (synthetic: everything needed to regenerate it)."""
        if self.is_synthetic:
            return {"dataset": SYNTHETIC, **asdict(self.synthetic_config())}
        return {
            "dataset": "image_folder",
            "root": str(Path(self.source).resolve()),
            "layout": self.layout(),
            "image_size": self.image_size,
            "resize": self.resize,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "val_source": None if self.val_source is None else str(Path(self.val_source).resolve()),
        }


def folder_layout(root: Path) -> str:
    """``"splits"`` when ``root`` holds split folders (``train/<class>``, ``val/<class>``), else ``"classes"``.

    Raises:
        ValueError: ``root`` does not exist or is not a directory.
    """
    if not root.is_dir():
        raise ValueError(f"dataset root '{root}' {'is not a directory' if root.exists() else 'does not exist'}")
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    train = root / "train"
    if folders and folders <= set(SPLIT_FOLDERS) and "train" in folders:
        if any(p.is_dir() and not p.name.startswith(".") for p in train.iterdir()):
            return "splits"
    return "classes"


def _synthetic_split(config: SyntheticConfig, split: str, cache: bool) -> ImageSplit:
    parts = SyntheticParts(config, split)
    if cache:
        parts.tensors()  # generated once into memory; items are then slices of it
    n = len(parts)
    return ImageSplit(
        parts,
        [i % NUM_CLASSES for i in range(n)],  # render_sample: image i is of class i mod NUM_CLASSES
        CLASS_NAMES,
        Preprocessing(config.image_size),
        {"dataset": SYNTHETIC, **asdict(config), "split": split},
        in_memory=True,
        item_name=lambda i: f"synthetic {split} image {i}",
    )


class _FolderItems:
    """Items ``indices`` of an :class:`ImageFolderDataset`, decoded on access (raises on an unreadable file)."""

    def __init__(self, dataset: ImageFolderDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        return self.dataset.read(self.indices[position])

    def name(self, position: int) -> str:
        return str(self.dataset.samples[self.indices[position]][0])


def _folder_split(
    dataset: ImageFolderDataset, indices: list[int] | None, split: str, description: dict, workers: int | None
) -> ImageSplit:
    items = _FolderItems(dataset, list(range(len(dataset))) if indices is None else indices)
    labels = [dataset.samples[i][1] for i in items.indices]
    result = ImageSplit(
        items,
        labels,
        dataset.class_names,
        dataset.recipe,
        {**description, "split": split, "images": len(items)},
        item_name=items.name,
    )
    result.workers = workers
    return result


def _open_folder(root: Path, recipe: Preprocessing) -> ImageFolderDataset:
    # validate=False: listing only. Files are decoded when read (in loader workers); unreadable ones are
    # skipped there, with one warning per pass, instead of a full decoding pass before any work starts.
    return ImageFolderDataset(root, recipe, validate=False)


def _check_same_classes(reference: Path, other: ImageFolderDataset) -> None:
    """Refuse a split folder whose classes are not those of ``reference`` (compared by name, nothing listed)."""
    expected = folder_class_names(reference)
    if expected != other.class_names:
        missing = sorted(set(expected) - set(other.class_names))
        extra = sorted(set(other.class_names) - set(expected))
        raise ValueError(
            f"the class folders of '{other.root}' differ from those of '{reference}' "
            f"(missing {missing[:5]}, extra {extra[:5]}); labels would not match"
        )


def open_split(spec: DataSpec, split: str, cache: bool = True) -> ImageSplit:
    """One split of ``spec`` (see :meth:`DataSpec.splits` for the names).

    Args:
        cache: synthetic only: generate the whole split into memory now (fast repeated passes);
            with ``False`` images are rendered when read.

    Raises:
        ValueError: an unknown split name (the message lists the valid ones), a folder that is not
            a dataset, or split folders whose classes differ.
    """
    if spec.is_synthetic:
        if split not in SPLITS:
            raise ValueError(f"the embedded dataset has splits {list(SPLITS)}, got {split!r}")
        return _synthetic_split(spec.synthetic_config(), split, cache)
    valid = spec.splits()
    if split not in valid:
        raise ValueError(f"the image folder '{spec.source}' has splits {list(valid)}, got {split!r}")
    root, recipe, description, layout = Path(spec.source), spec.preprocessing(), spec.describe(), spec.layout()
    if split == "val" and spec.val_source is not None:
        val = _open_folder(Path(spec.val_source), recipe)
        _check_same_classes(root / "train" if layout == "splits" else root, val)
        return _folder_split(val, None, split, description, spec.workers)
    if layout == "splits":
        dataset = _open_folder(root / split, recipe)
        if split != "train":
            _check_same_classes(root / "train", dataset)
        return _folder_split(dataset, None, split, description, spec.workers)
    dataset = _open_folder(root, recipe)
    if split == "all" or (split == "train" and spec.val_source is not None):  # a separate val folder: train on all
        return _folder_split(dataset, None, split, description, spec.workers)
    train_idx, val_idx = dataset.split(spec.val_fraction, spec.seed)
    return _folder_split(dataset, train_idx if split == "train" else val_idx, split, description, spec.workers)


def open_training_data(spec: DataSpec) -> TrainingData:
    """The ``train`` and ``val`` splits of ``spec``.

    Classes layout without ``val_source``: the seeded split; splits layout without a ``val`` folder
    or ``val_source``: a seeded split of ``train`` (``val_fraction`` of it). Either way the folder is
    listed once for both splits.
    """
    if spec.is_synthetic:
        return TrainingData(open_split(spec, "train"), open_split(spec, "val"), spec.describe())
    layout, description = spec.layout(), spec.describe()
    seeded = None
    if layout == "classes" and spec.val_source is None:
        seeded = Path(spec.source)
    elif layout == "splits" and "val" not in spec.splits():
        seeded = Path(spec.source) / "train"
    if seeded is None:
        return TrainingData(open_split(spec, "train"), open_split(spec, "val"), description)
    dataset = _open_folder(seeded, spec.preprocessing())
    train_idx, val_idx = dataset.split(spec.val_fraction, spec.seed)
    train = _folder_split(dataset, train_idx, "train", description, spec.workers)
    val = _folder_split(dataset, val_idx, "val", description, spec.workers)
    return TrainingData(train, val, description)


def open_recorded_split(description: dict[str, Any], cache: bool = False) -> ImageSplit:
    """Reopen the split a description (``ImageSplit.description``, e.g. in ``concept_stats.json``) names.

    Raises:
        ValueError: the description names no known dataset, or its folder is not readable here
            (moved, deleted, another machine) — the message says which.
    """
    dataset = description.get("dataset")
    split = description.get("split")
    if dataset == SYNTHETIC:
        return _synthetic_split(SyntheticConfig.from_description(description), str(split), cache)
    if dataset == "image_folder":
        root = description.get("root")
        if not root or not Path(root).is_dir():
            raise ValueError(f"the dataset folder {root!r} recorded with these statistics is not readable here")
        spec = DataSpec(
            source=str(root),
            image_size=int(description["image_size"]),
            seed=int(description.get("seed", 0)),
            val_fraction=float(description.get("val_fraction", 0.1)),
            resize=description.get("resize"),
            val_source=description.get("val_source"),
        )
        return open_split(spec, str(split))
    raise ValueError(f"unknown dataset description {dataset!r}; expected 'synthetic' or 'image_folder'")
