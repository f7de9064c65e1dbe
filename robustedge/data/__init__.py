"""Datasets as whole uint8 tensors, split deterministically, augmented in batches on the device.

Adversarial training runs 10+ forward/backward passes per batch, so a per-sample PIL pipeline would
starve the model; instead every split lives as one ``uint8`` tensor (N, C, H, W) on the training
device and random-crop + flip happen batched there (:func:`random_crop_flip`).

The package's parts: ``splits`` (:class:`Split`, :class:`Dataset`, seeded hold-outs), ``readers`` (the
digits, CIFAR-10/100, SVHN and image-folder readers), ``registry`` (:data:`DATASETS`,
:func:`load_dataset`, :func:`split_for_model`), ``calibration`` (the INT8 calibration sample) and
``loader`` (:class:`DeviceLoader`, :func:`random_crop_flip`). Everything is importable from here.
"""

from robustedge.data.calibration import calibration_images, calibration_indices
from robustedge.data.loader import DeviceLoader, random_crop_flip
from robustedge.data.readers import IMAGE_SUFFIXES
from robustedge.data.registry import DATASETS, load_dataset, split_for_model
from robustedge.data.splits import Dataset, Split

__all__ = ["DATASETS", "Dataset", "DeviceLoader", "IMAGE_SUFFIXES", "Split", "calibration_images",
           "calibration_indices", "load_dataset", "random_crop_flip", "split_for_model"]
