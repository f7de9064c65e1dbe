"""The calibration sample INT8 post-training quantisation and QAT's PTQ start share."""

from __future__ import annotations

import torch

from robustedge.data.splits import Split


def calibration_indices(split: Split, n: int, seed: int) -> torch.Tensor:
    """The ``n`` examples of ``split`` drawn with ``seed`` that INT8 post-training quantisation and
    QAT's PTQ start calibrate on, so both see the same images."""
    return torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n]


def calibration_images(split: Split, n: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`calibration_indices`' images as floats in [0, 1]."""
    return split.images[calibration_indices(split, n, seed)].to(device).float().div_(255.0)
