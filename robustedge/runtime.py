"""Devices, seeds and progress bars: the small pieces every command needs the same way."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from concurrent.futures import Executor
from typing import Any, Callable, Iterable, Iterator, TypeVar

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


def progress(iterable: Iterable[T] | None, desc: str, total: int | None = None, enabled: bool = True,
             **kw) -> Iterable[T]:
    """A tqdm bar on stderr, off when asked or when ROBUSTEDGE_NO_PROGRESS is set (CI logs). With
    ``iterable=None`` it is a bar to ``update()`` by hand, or None when off."""
    if not enabled or os.environ.get("ROBUSTEDGE_NO_PROGRESS"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def parallel_plan(device: torch.device, jobs: int) -> tuple[int, int]:
    """(worker processes, threads each) for ``jobs`` independent small-model jobs.

    Small models on a CPU are bound by per-operator overhead, not arithmetic: one thread gets
    nearly as many images/s as two, so two runs side by side with one thread each finish in
    about half the time of the same runs one after another with two threads each (measured in
    bench/RESULTS.md). On a GPU the jobs run one after another in this process.
    """
    cores = cpu_cores()
    if device.type != "cpu" or jobs < 2 or cores < 2:
        return 1, torch.get_num_threads()
    workers = min(jobs, cores)
    return workers, max(1, cores // workers)


def _die_with_parent() -> None:
    """Linux: have the kernel stop this worker when its parent dies (a killed quickstart must not
    leave runs training in the background and writing into its folder)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - no glibc
        pass


def _init_worker(threads: int) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    os.environ["ROBUSTEDGE_NO_PROGRESS"] = "1"  # interleaved bars from several processes are unreadable


@contextlib.contextmanager
def worker_pool(workers: int, threads: int) -> Iterator[Executor | None]:
    """Spawned workers kept for several rounds of jobs (None when ``workers`` <= 1: jobs then run in this
    process). Each new worker is a fresh interpreter that imports torch and RobustEdge (about 2 s on the
    2-core build machine) and then its jobs' lazy imports (torchao, onnx, AutoAttack), so a command that
    runs jobs in several phases, the quickstart, starts its workers once."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    with contextlib.ExitStack() as stack:
        with _interrupts_deferred():  # every worker is started here, whole, before an interruption acts
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                           initargs=(threads,)))
            for _ in range(workers):  # each submit that finds no idle worker starts one
                pool.submit(_started)
        yield pool


def _started() -> None:
    """The job that makes the pool start a worker (see :func:`worker_pool`)."""


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back while the block runs, then raised again to the handlers that were
    in place (the quickstart turns SIGTERM into an interruption, see quickstart.py).

    Why: an interruption raised half-way through ``multiprocessing``'s starting of a worker leaves a
    child reading a truncated pickle (an ``EOFError`` traceback under "robustedge: interrupted"), or a
    child the executor never learns about, which dies at exit holding a semaphore registered with the
    resource tracker ("leaked semaphore objects"). Starting two workers takes milliseconds of the
    main thread, so the delay is not felt."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: handler for signum, handler in previous.items() if handler is not None}
    for signum in previous:
        signal.signal(signum, lambda got, frame: caught.append(got))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


def iter_jobs(fn: Callable[[Any], T], items: list[Any], workers: int, threads: int,
              pool: Executor | None = None) -> Iterator[T]:
    """``fn(item)`` for each item, yielded in order as they finish, in ``workers`` spawned processes
    when more than one (those of ``pool`` when given, see :func:`worker_pool`).

    ``fn`` must be a module-level function and items picklable; the first exception raised in a
    worker is re-raised here.
    """
    with contextlib.nullcontext(pool) if pool is not None else worker_pool(workers, threads) as runner:
        yield from (map if runner is None else runner.map)(fn, items)


def run_jobs(fn: Callable[[Any], T], items: list[Any], workers: int, threads: int,
             pool: Executor | None = None) -> list[T]:
    """All of :func:`iter_jobs` as a list."""
    return list(iter_jobs(fn, items, workers, threads, pool))
