"""A dataset as whole uint8 tensors: :class:`Split` (images + labels), :class:`Dataset` (train/val/test),
and the seeded hold-outs that carve validation (and digits' test) splits, so a split never moves."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from robustedge.errors import RobustEdgeError, unknown_name
from robustedge.seeds import holdout_seed


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, n: int | None) -> "Split":
        """The first ``n`` examples (the evaluation protocol always takes a prefix, so runs agree)."""
        if n is None or n >= len(self):
            return self
        return Split(self.images[:n], self.labels[:n])

    def subset(self, n: int | None, seed: int) -> "Split":
        """A seeded random ``n`` of these examples, in their order (all of them for None or ``n`` >= the
        split's size). Random, not a prefix: a prefix of a class-sorted folder would hold one class."""
        if n is None or n >= len(self):
            return self
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(holdout_seed(seed, "train_n")))[:n]
        keep = keep.sort().values
        return Split(self.images[keep], self.labels[keep])

    def shortfall(self, asked: int | None) -> str:
        """What a count of examples printed beside this split must add when more were asked for than the
        split holds, so that a run asked for 500 digits does not read as one on 500: ``""`` otherwise. It
        names no flag: the CLI's ``--n`` and the API's ``n`` print the same note."""
        return f" (all of them: {asked} were asked for)" if asked is not None and asked > len(self) else ""

    def float_images(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.images.to(device).float().div_(255.0)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise unknown_name("split", name, ["train", "val", "test"])
        return getattr(self, name)


def _seeded_holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, held_out): a seeded permutation, so the validation split never moves."""
    if not 0.0 <= fraction < 1.0:
        raise RobustEdgeError(f"validation fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_out = int(round(n * fraction))
    return perm[n_out:].sort().values, perm[:n_out].sort().values


def _train_val(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[Split, Split]:
    keep, held = _seeded_holdout(len(labels), val_fraction, holdout_seed(seed, "val"))
    return Split(images[keep], labels[keep]), Split(images[held], labels[held])
