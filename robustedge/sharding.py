"""Evaluation over many processes: the examples are cut into fixed blocks, the blocks dealt round-robin
to the ranks of an initialised process group, and every rank gets back every block's results in order.

The numbers do not depend on how many processes ran them, because nothing random depends on which
process or batch an example landed in: the random start of example ``i`` comes from its own generator
(:func:`example_uniform`, seeded by the evaluation seed and ``i``), and AutoAttack, whose official
implementation reseeds per call and draws per batch, runs on the same fixed blocks of the example index
whatever the world size. One process runs the same blocks in the same order.

Sharding is asked for, never implied by an initialised process group: a DDP training run validates on
rank 0 alone, and a collective there would wait for ranks that never come. Ranks advance in lock-step
rounds (one block each), and the examples finished in a round are summed over ranks, so rank 0's
progress bar shows the total. Works with gloo (CPUs) and NCCL (GPUs); multi-node through torchrun's
rendezvous (docs/design/any-model.md, "Evaluation over many processes").
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from robustedge.errors import RobustEdgeError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun described in the environment (gloo on CPUs, NCCL on GPUs);
    each rank takes the GPU of its LOCAL_RANK. Outside torchrun: one process, ``device`` unchanged."""
    if not launched_by_torchrun():
        return World.current(), device
    if not dist.is_available():
        raise RobustEdgeError("this torch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World.current(), device


@contextmanager
def rank_zero_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it is done: for downloads and caches
    (datasets, RobustBench weights) that every rank needs but only one may write."""
    if world.size > 1 and not world.main:
        dist.barrier()
    yield
    if world.size > 1 and world.main:
        dist.barrier()


def leave(wait: bool = True) -> None:
    """Leave the process group (a rank exiting with gloo's threads still up aborts: "terminate called
    without an active exception"), after a barrier so that no rank leaves while another still gathers;
    ``wait=False`` on an error, when the other ranks may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_min(value: int, world: World) -> int:
    """The smallest ``value`` over the ranks of ``world`` (e.g. an automatic batch size measured on each
    rank's free memory, which must be the same everywhere for the blocks to be the same)."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """Fixed ``[start, stop)`` blocks of the example index."""
    if size < 1:
        raise RobustEdgeError(f"block size must be >= 1, got {size}")
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def example_uniform(shape: tuple[int, ...], seed: int, start: int, stop: int, device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) draws of shape ``(stop - start, *shape)``; example ``i``'s from its own generator seeded by
    ``(seed, i)``, so its random start is the same in any batch, block or process."""
    out = torch.empty((stop - start, *shape), dtype=dtype)
    gen = torch.Generator()
    for row, index in enumerate(range(start, stop)):
        gen.manual_seed((int(seed) << 32) + index)
        out[row] = torch.rand(shape, generator=gen, dtype=dtype)
    return out.to(device)


def run_sharded(fn: Callable[[int, int], dict[str, torch.Tensor]], n: int, block: int, *, world: World,
                desc: str, show_progress: bool = True, device: torch.device | str = "cpu", first: int = 0,
                on_block: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """``fn(start, stop)`` on this rank's blocks of ``world`` (every rank of it must call this; ``World()``:
    this process alone); returns every block's outputs concatenated in index order, on every rank (on
    ``device``). ``fn`` must return tensors whose first axis is the block.

    ``first`` skips the examples before it (a resumed evaluation: the blocks are cut from ``first``, so it
    must be a block boundary of the full run wherever blocks matter, as for AutoAttack); the outputs then
    cover ``[first, n)``. ``on_block(stop, this block's outputs)`` is called after each block when this
    process runs alone (the blocks then finish in index order), for saving progress."""
    spans = [(start, min(start + block, n)) for start in range(first, n, block)] if block >= 1 else blocks(n, block)
    from robustedge.runtime import progress

    mine: dict[int, dict[str, torch.Tensor]] = {}
    bar = progress(None, desc + (f" ({world.size} processes)" if world.size > 1 else ""), total=n - first,
                   enabled=show_progress and world.main)
    try:
        for round_ in range(math.ceil(len(spans) / world.size)):
            index = round_ * world.size + world.rank
            done = 0
            if index < len(spans):
                start, stop = spans[index]
                mine[index] = {k: v.detach().cpu() for k, v in fn(start, stop).items()}
                done = stop - start
                if on_block is not None and world.size == 1:
                    on_block(stop, mine[index])
            if world.size > 1:
                count = torch.tensor([done], dtype=torch.int64, device=_comm_device())
                dist.all_reduce(count)
                done = int(count.item())
            if bar is not None:
                bar.update(done)
    finally:
        if bar is not None:
            bar.close()
    if world.size > 1:
        gathered: list = [None] * world.size
        dist.all_gather_object(gathered, mine)
        mine = {index: out for part in gathered for index, out in part.items()}
    if not spans:
        return {}
    keys = mine[0].keys()
    return {k: torch.cat([mine[i][k] for i in range(len(spans))]).to(device) for k in keys}
