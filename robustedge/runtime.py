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


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel stop this worker when its parent dies (a killed quickstart must not
    leave runs training in the background and writing into its folder). A parent that died before
    this line ran is caught by comparing pids: the worker would otherwise wait for jobs forever."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - no glibc
        return
    if os.getppid() != parent:
        os._exit(1)


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    os.environ["ROBUSTEDGE_NO_PROGRESS"] = "1"  # interleaved bars from several processes are unreadable


@contextlib.contextmanager
def worker_pool(workers: int, threads: int) -> Iterator[Executor | None]:
    """Spawned workers kept for several rounds of jobs (None when ``workers`` <= 1: jobs then run in this
    process). Each new worker is a fresh interpreter that imports torch and RobustEdge (about 2 s on the
    2-core build machine) and then its jobs' lazy imports (torchao, onnx, AutoAttack), so a command that
    runs jobs in several phases, the quickstart, starts its workers once.

    All workers start on entry, with interruptions held back (:func:`_interrupts_deferred`). When the
    block ends with an exception (an interruption, a failed job) the workers are stopped rather than
    waited for: their running jobs may have minutes left, and a second Ctrl-C while the executor's
    shutdown waits can leave it hung (CPython 3.11-3.12 mark the executor's thread as stopped when
    its join is interrupted, and the exit then closes the queue its stop messages travel on)."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    pool = None
    try:
        with _interrupts_deferred():  # every worker is started here, whole; an interruption acts after
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                       initargs=(threads, os.getpid()))
            for _ in range(workers):  # each submit that finds no idle worker starts one
                pool.submit(_started)
        yield pool
    except BaseException:
        if pool is not None:
            with _interrupts_deferred():
                _stop_workers(pool)
        raise
    with _interrupts_deferred():
        pool.shutdown(wait=True)


def _started() -> None:
    """The job that makes the pool start a worker (see :func:`worker_pool`)."""


def _stop_workers(pool: Executor) -> None:
    """Cancel the queued jobs, terminate the workers and wait for the executor's thread to notice (it
    fails their futures and closes the queues): ``ProcessPoolExecutor.terminate_workers`` from Python
    3.14 on, the same steps on older ones."""
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown(wait=False) forgets it
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:  # pragma: no cover - Python 3.14+
        terminate()
    else:
        processes = dict(getattr(pool, "_processes", None) or {})
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            if process.is_alive():
                process.terminate()
    if manager is not None:
        manager.join()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back while the block runs, then raised again to the handlers that were
    in place (the quickstart turns SIGTERM into an interruption, see quickstart.py). Signals that are
    ignored stay ignored (spawned workers inherit that).

    Why: an interruption raised half-way through ``multiprocessing``'s starting of a worker leaves a
    child reading a truncated pickle (an ``EOFError`` traceback under "robustedge: interrupted"), or a
    child the executor never learns about, which dies at exit holding a semaphore registered with the
    resource tracker ("leaked semaphore objects"). Starting two workers takes milliseconds of the
    main thread, so the delay is not felt."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield  # only the main thread runs handlers; without POSIX signal masks (Windows) nothing is held back
        return
    signums = {signal.SIGINT, signal.SIGTERM}
    caught: list[int] = []
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signums)  # no signal between two handler swaps
    try:
        previous = {signum: signal.getsignal(signum) for signum in signums}
        previous = {signum: handler for signum, handler in previous.items()
                    if handler is not None and handler != signal.SIG_IGN}
        for signum in previous:
            signal.signal(signum, lambda got, frame: caught.append(got))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, signums)
        try:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came during the swap acts here
        _raise_each(list(dict.fromkeys(caught)))


def _raise_each(signums: list[int]) -> None:
    """Every caught signal reaches its handler, even when the first one's raises."""
    if signums:
        import signal

        try:
            signal.raise_signal(signums[0])
        finally:
            _raise_each(signums[1:])


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
