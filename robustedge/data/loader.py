"""Batched device-side augmentation and iteration.

Adversarial training runs 10+ forward/backward passes per batch, so a per-sample PIL pipeline would
starve the model; instead every split lives as one ``uint8`` tensor on the training device and random
crop + flip happen batched there (:func:`random_crop_flip`).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from robustedge.data.splits import Split
from robustedge.errors import RobustEdgeError
from robustedge.seeds import augment_seed, shuffle_seed


def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (zero padding) + horizontal flip for a whole batch at once, on x's device."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class DeviceLoader:
    """Iterates a :class:`Split` kept on ``device`` in shuffled, augmented float batches in [0, 1].

    The order and augmentation of epoch ``e`` depend only on ``(seed, e)``, which is what makes a
    resumed run bitwise identical to an uninterrupted one without saving loader state. Under DDP
    every rank draws the same permutation and keeps its own interleaved shard of it.
    """

    def __init__(self, split: Split, batch_size: int, *, device: torch.device | str = "cpu",
                 shuffle: bool = True, augment: bool = False, padding: int = 4, flip: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise RobustEdgeError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.augment, self.padding, self.flip = batch_size, shuffle, augment, padding, flip
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            gen = torch.Generator().manual_seed(shuffle_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = math.ceil(n / self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])  # pad like DistributedSampler
            order = order[self.rank::self.world_size]
        return order.to(self.device)

    def __len__(self) -> int:
        n = math.ceil(len(self.labels) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device).manual_seed(augment_seed(self.seed, self.epoch, self.rank))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, self.padding, self.flip, gen)
            yield x.float().div_(255.0), self.labels[idx]
