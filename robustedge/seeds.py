"""Every seed RobustEdge derives from a user's seed, in one place.

These formulas are part of the reproducibility contract: a run is a function of its config, and a
resumed run replays the uninterrupted one bit for bit because each epoch's randomness is derived
from (seed, epoch, rank) rather than carried as state. Changing a formula changes every result
that depends on it, so they only ever change here, on purpose.
"""

from __future__ import annotations


def holdout_seed(seed: int, split: str) -> int:
    """The permutation that carves a held-out split: ``val`` from train, ``test`` for datasets
    without an official test set (digits); ``train_n``: which training images a run limited to
    ``data.train_n`` of them keeps."""
    return {"val": seed, "test": seed + 1, "train_n": seed + 2}[split]


def shuffle_seed(seed: int, epoch: int) -> int:
    """The data order of an epoch (the same on every DDP rank; each keeps its own shard)."""
    return seed * 1_000_003 + epoch


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """Random crops and flips of an epoch on one rank."""
    return seed * 7_919 + epoch * 31 + rank


def attack_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG at the start of an epoch: the training attacks' random starts."""
    return seed * 1_000_003 + epoch * 101 + rank
