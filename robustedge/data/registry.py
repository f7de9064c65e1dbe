"""The dataset registry: a name -> a reader called as ``reader(root, image_size, channels, val_fraction,
seed, download)`` returning a :class:`~robustedge.data.splits.Dataset`; and the two ways in,
:func:`load_dataset` (by name) and :func:`split_for_model` (the data a checkpoint was trained on)."""

from __future__ import annotations

from typing import Callable

from robustedge.data.readers import _load_cifar, _load_digits, _load_imagefolder, _load_svhn
from robustedge.data.splits import Dataset, Split
from robustedge.errors import RobustEdgeError
from robustedge.registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset", {
    "digits": _load_digits,
    "cifar10": lambda *a, **k: _load_cifar("cifar10", *a, **k),
    "cifar100": lambda *a, **k: _load_cifar("cifar100", *a, **k),
    "svhn": _load_svhn,
    "imagefolder": _load_imagefolder,
})


def load_dataset(name: str, root: str | None = None, *, image_size: int | None = None,
                 channels: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                 download: bool = False) -> Dataset:
    """Load a registry dataset as uint8 tensors with seeded train/val/test splits.

    ``image_size``/``channels`` default to the dataset's standard shape (digits: 16x16, 1 channel,
    upscaled from the 8x8 originals).
    """
    reader = DATASETS.get(name)  # an unknown name: the one-line error listing the valid ones
    if image_size is not None and image_size < 8:
        raise RobustEdgeError(f"image size must be >= 8, got {image_size}")
    if channels is not None and channels not in (1, 3):
        raise RobustEdgeError(f"channels must be 1 or 3, got {channels}")
    return reader(root, image_size, channels, val_fraction, seed, download)


def split_for_model(meta, dataset: str | None, data_root: str | None, split: str, n: int | None,
                    download: bool = False) -> Split:
    """A split of the data a model was trained on, shaped and split exactly as in its training run
    (``meta`` is the model's :class:`~robustedge.checkpoint.ModelMeta`)."""
    data = meta.extra.get("data", {})
    name = dataset or meta.dataset
    ds = load_dataset(name, data_root or data.get("root"), image_size=meta.spec.image_size,
                      channels=meta.spec.in_channels, val_fraction=data.get("val_fraction", 0.1),
                      seed=data.get("seed", 0), download=download)
    if ds.num_classes != meta.spec.num_classes:
        raise RobustEdgeError(f"dataset '{name}' has {ds.num_classes} classes but the checkpoint's "
                              f"{meta.spec.arch} has {meta.spec.num_classes} outputs")
    chosen = ds.split(split)
    if split == "train":  # the images it trained on (data.train_n), which INT8 calibration must share with QAT's
        chosen = chosen.subset(data.get("train_n"), data.get("seed", 0))
    return chosen.take(n)
