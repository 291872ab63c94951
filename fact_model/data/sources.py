"""Where training and evaluation images come from: the embedded synthetic dataset or an image folder.

A :class:`DataSpec` names the source; :func:`load_training_data` and
:func:`load_split` turn it into uint8 tensors held in memory (the datasets of this
tool are small; a user folder is decoded once, with a progress bar).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fact_model.config import Preprocessing
from fact_model.data.folder import ImageFolderDataset
from fact_model.data.synthetic import CLASS_NAMES, SyntheticConfig, SyntheticParts
from fact_model.training.common import TrainingData

__all__ = ["SYNTHETIC", "DataSpec", "load_split", "load_training_data"]

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class DataSpec:
    """A data source.

    Attributes:
        source: ``"synthetic"`` (the embedded dataset) or the path of an image folder
            (one sub-folder per class).
        image_size: model input size (synthetic: the generated size).
        seed: synthetic generation seed / folder train-val split seed.
        train, val, test: synthetic split sizes.
        val_fraction: share of a folder held out for validation.
        resize: folder preprocessing: shorter side before the centre crop (None: plain resize).
    """

    source: str = SYNTHETIC
    image_size: int = 48
    seed: int = 0
    train: int = 6000
    val: int = 1000
    test: int = 1000
    val_fraction: float = 0.1
    resize: int | None = None

    @property
    def is_synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(
            image_size=self.image_size, seed=self.seed, train=self.train, val=self.val, test=self.test
        )

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.image_size, resize=None if self.is_synthetic else self.resize)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for provenance (synthetic: everything needed to regenerate it)."""
        if self.is_synthetic:
            return {"dataset": SYNTHETIC, **asdict(self.synthetic_config())}
        return {"dataset": "image_folder", "root": str(Path(self.source).resolve()), **asdict(self)}


def _folder_tensors(
    dataset: ImageFolderDataset, indices: list[int], desc: str, progress: bool
) -> tuple[Tensor, Tensor]:
    images = torch.empty(len(indices), 3, dataset.recipe.input_size, dataset.recipe.input_size, dtype=torch.uint8)
    labels = torch.empty(len(indices), dtype=torch.long)
    for row, index in enumerate(tqdm(indices, desc=desc, disable=not progress, leave=False)):
        image, label = dataset[index]
        images[row] = (image * 255).round().to(torch.uint8)
        labels[row] = label
    return images, labels


def _folder(spec: DataSpec) -> ImageFolderDataset:
    return ImageFolderDataset(spec.source, spec.preprocessing())


def load_training_data(spec: DataSpec, progress: bool = True) -> TrainingData:
    """Train and validation splits of ``spec`` in memory."""
    if spec.is_synthetic:
        config = spec.synthetic_config()
        train = SyntheticParts(config, "train").tensors(progress=progress)
        val = SyntheticParts(config, "val").tensors(progress=progress)
        return TrainingData(
            train[0], train[1], val[0], val[1], tuple(CLASS_NAMES), spec.preprocessing(), spec.describe()
        )
    dataset = _folder(spec)
    train_idx, val_idx = dataset.split(spec.val_fraction, spec.seed)
    train = _folder_tensors(dataset, train_idx, "loading train images", progress)
    val = _folder_tensors(dataset, val_idx, "loading val images", progress)
    return TrainingData(*train, *val, tuple(dataset.class_names), spec.preprocessing(), spec.describe())


def load_split(spec: DataSpec, split: str, progress: bool = True) -> tuple[Tensor, Tensor, tuple[str, ...], dict]:
    """One split as ``(images uint8 (N,3,S,S), labels (N,), class_names, description)``.

    Synthetic splits: ``train``, ``val``, ``test``. Folders: ``train``/``val`` (the
    seeded split) or ``all``.
    """
    if spec.is_synthetic:
        images, labels, _ = SyntheticParts(spec.synthetic_config(), split).tensors(progress=progress)
        return images, labels, tuple(CLASS_NAMES), {**spec.describe(), "split": split}
    dataset = _folder(spec)
    if split == "all":
        indices = list(range(len(dataset)))
    elif split in ("train", "val"):
        indices = dataset.split(spec.val_fraction, spec.seed)[0 if split == "train" else 1]
    else:
        raise ValueError(f"an image folder has splits 'train', 'val' and 'all', got {split!r}")
    images, labels = _folder_tensors(dataset, indices, f"loading {split} images", progress)
    return images, labels, tuple(dataset.class_names), {**spec.describe(), "split": split}
