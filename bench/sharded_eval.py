"""Evaluation over 1 vs N processes on a real student: wall time of `robustedge eval`, and proof that the
per-example results are the same.

    python bench/sharded_eval.py                                    # the quickstart's B-MTARD student
    python bench/sharded_eval.py --checkpoint runs/x/best.safetensors --processes 2 4 --n 400

Each configuration runs the real command line: ``python -m robustedge.cli eval ...`` for one process
(all cores as threads) and ``torchrun --standalone --nproc_per_node P -m robustedge.cli eval ...`` with
cores / P threads per rank. The examples, batch sizes and seed are the same, so ``eval.json``'s
per-example ``correct`` strings must be identical (the bench stops if not). AutoAttack runs on blocks
of ``--aa-batch-size`` whatever the process count (docs/design/any-model.md section 11), so choose it as
examples / max(processes) to give every rank work. Times are wall seconds of the whole command
(start-up, data, model load included), the median of ``--repeats`` alternating runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(processes: int, checkpoint: str, out: Path, args: argparse.Namespace) -> list[str]:
    tail = ["eval", checkpoint, "--num-examples", str(args.n), "--attacks", args.attacks,
            "--batch-size", str(args.batch_size), "--aa-batch-size", str(args.aa_batch_size), "--seed", "0",
            "--device", "cpu", "--no-flags", "--no-progress", "--out", str(out)] + (["--fold-bn"] if args.fold_bn else [])
    if processes == 1:
        return [sys.executable, "-m", "robustedge.cli", *tail]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "robustedge.cli", *tail]


def _threads(processes: int) -> int:
    return max(1, (os.cpu_count() or 1) // processes)


def _run(processes: int, checkpoint: str, args: argparse.Namespace, scratch: Path) -> tuple[float, dict]:
    out = scratch / f"p{processes}_{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": str(_threads(processes))}
    start = time.perf_counter()
    done = subprocess.run(_command(processes, checkpoint, out, args), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((out / "eval.json").read_text())
    shutil.rmtree(out)
    return seconds, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/quickstart/student_bmtard/best.safetensors")
    p.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts compared with 1")
    p.add_argument("--n", type=int, default=200, help="test examples")
    p.add_argument("--attacks", default="clean,pgd20,autoattack")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--aa-batch-size", type=int, default=100)
    p.add_argument("--fold-bn", action="store_true", help="attack the folded copy, as the quickstart does")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"not found: {args.checkpoint} (run `robustedge quickstart` first, or pass --checkpoint)")
    if any(n < 2 for n in args.processes):
        p.error("--processes are counts >= 2 (one process is always measured)")
    counts = [1, *args.processes]
    times: dict[int, list[float]] = {c: [] for c in counts}
    reports: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sharded_eval_") as scratch:
        for _ in range(args.repeats):
            for count in counts:
                seconds, reports[count] = _run(count, args.checkpoint, args, Path(scratch))
                times[count].append(seconds)
                print(f"{count} process(es): {seconds:.1f} s", flush=True)
    reference = reports[1]
    columns = [a for a in ["clean", *args.attacks.split(",")] if a in reference["accuracy"]]
    columns = list(dict.fromkeys(columns))
    for count in args.processes:
        if reports[count]["correct"] != reference["correct"]:
            raise SystemExit(f"{count} processes gave different per-example results than one process")
    base = statistics.median(times[1])
    print(f"\n{os.cpu_count()} cores; {args.n} examples; attacks {args.attacks}; batch {args.batch_size}, "
          f"AutoAttack blocks of {args.aa_batch_size}; median of {args.repeats}")
    print("| processes | threads each | wall (s) | speed-up | " +
          " | ".join(f"{a} (%)" for a in columns) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(columns))
    for count in counts:
        median = statistics.median(times[count])
        accuracy = " | ".join(f"{100 * reports[count]['accuracy'][a]:.1f}" for a in columns)
        print(f"| {count} | {_threads(count)} | {median:.1f} | {base / median:.2f}x | "
              f"{accuracy} |")
    print("per-example results identical across process counts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
