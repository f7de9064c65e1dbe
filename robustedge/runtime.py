"""Devices, seeds and progress bars: the small pieces every command needs the same way."""

from __future__ import annotations

import os
import random
import sys
from typing import Iterable, TypeVar

import numpy as np
import torch

from robustedge.errors import RobustEdgeError

T = TypeVar("T")


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is a user error, not a crash."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RobustEdgeError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RobustEdgeError(f"device '{name}' asked for but CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RobustEdgeError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        raise RobustEdgeError(f"unsupported device '{name}'; use auto, cpu, cuda or cuda:N")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True, **kw) -> Iterable[T]:
    """A tqdm bar on stderr, off when asked or when ROBUSTEDGE_NO_PROGRESS is set (CI logs)."""
    if not enabled or os.environ.get("ROBUSTEDGE_NO_PROGRESS"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)
