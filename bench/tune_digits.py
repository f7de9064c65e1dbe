"""Learning-rate search for the digits students, on the validation split only (never the test set).

    python bench/tune_digits.py                                   # every method, lr 0.05..0.8, seeds 0,1
    python bench/tune_digits.py --methods bmtard,rslad --lrs 0.1,0.2 --seeds 0
    python bench/tune_digits.py --lrs-for ard=0.4,0.8,1.6 --lrs-for pgd_at=0.025,0.05  # per-method grids

The quickstart's MobileNetV2 (width 0.25) student with its settings (digits 8x8, eps 0.1, 20 epochs,
the quickstart's teachers, trained once and shared); only the method, the learning rate (milestones
stay at 75% and 90% of the epochs) and the seed change. The score is what the trainer selects
checkpoints by: validation W-Robust = (clean + PGD-20) / 2 on the 144 held-out validation digits, at
the best epoch; a run whose loss diverged scores 0 (and is marked). Why it exists: the distillation losses now follow their authors' reduction (the KL
averaged over batch x classes, 10x smaller on 10 classes than before), so the old learning rate no
longer meant the same step. Finished runs are skipped when started again. Results go between markers
in docs/results/digits.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from replicate_digits import write_results
from robustedge.errors import RobustEdgeError
from robustedge.files import atomic_write_text
from robustedge.methods import get_method, method_names
from robustedge.quickstart import QuickstartSettings, quickstart_configs
from robustedge.runtime import cpu_cores, iter_jobs, parallel_plan, resolve_device, run_jobs
from robustedge.trainer import train

START, END = "<!-- tune_digits:start -->", "<!-- tune_digits:end -->"
DIVERGED = {"val_wrobust": 0.0, "val_clean": 0.0, "val_pgd20": 0.0, "epoch": 0, "diverged": True}  # scored as 0


def run(job: tuple) -> tuple[str, float, int, dict, float]:
    base, method, lr, seed, out = job
    cfg = copy.deepcopy(base)
    cfg.name, cfg.method, cfg.seed, cfg.out_dir = f"{method}_lr{lr:g}_s{seed}", method, seed, str(out)
    cfg.optim.lr = lr
    if not get_method(method).teacher_roles:
        cfg.teachers = {}
    result_file, diverged_file = out / cfg.name / "result.json", out / cfg.name / "diverged.json"
    start = time.perf_counter()
    if not result_file.exists() and not diverged_file.exists():
        try:
            train(cfg, resume=(out / cfg.name / "last.safetensors").exists())
        except RobustEdgeError as exc:  # a learning rate too high for the method: a result, not a crash
            if "loss became" not in str(exc):
                raise
            atomic_write_text(diverged_file, json.dumps({"error": str(exc)}))
    if diverged_file.exists():
        return method, lr, seed, DIVERGED, time.perf_counter() - start
    result = json.loads(result_file.read_text())
    best = max(result["history"], key=lambda row: row.get("val_wrobust", float("-inf")))
    return method, lr, seed, best, time.perf_counter() - start


def finished(out: Path) -> dict[tuple[str, float], list[dict]]:
    """Every finished run in ``out`` (this call's and earlier calls'): {(method, lr): [best epoch rows]}."""
    scores: dict[tuple[str, float], list[dict]] = {}
    for folder in sorted(out.glob("*_lr*_s*")):
        method, rest = folder.name.rsplit("_lr", 1)
        lr = float(rest.rsplit("_s", 1)[0])
        if (folder / "diverged.json").exists():
            scores.setdefault((method, lr), []).append(DIVERGED)
        elif (folder / "result.json").exists():
            history = json.loads((folder / "result.json").read_text())["history"]
            scores.setdefault((method, lr), []).append(max(history, key=lambda r: r.get("val_wrobust", float("-inf"))))
    return scores


def table(scores: dict[tuple[str, float], list[dict]]) -> str:
    """Mean validation W-Robust (clean / PGD-20) per method and lr, with the number of seeds where it
    differs from the most any lr of that method has; bold: the best among the lrs with the most seeds."""
    methods = list(dict.fromkeys(m for m, _ in sorted(scores)))
    lrs = sorted({lr for _, lr in scores})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for method in methods:
        most = max(len(scores.get((method, lr), [])) for lr in lrs)
        cells = []
        for lr in lrs:
            rows = scores.get((method, lr), [])
            if not rows:
                cells.append("")
                continue
            w = statistics.mean(100 * r["val_wrobust"] for r in rows)
            c = statistics.mean(100 * r["val_clean"] for r in rows)
            p = statistics.mean(100 * r["val_pgd20"] for r in rows)
            diverged = sum(1 for r in rows if r.get("diverged"))
            cells.append(f"{w:.1f} ({c:.0f} / {p:.0f})" + (f" [{len(rows)} seed]" if len(rows) < most else "")
                         + (f" [{diverged} diverged]" if diverged else ""))
        full = [lr for lr in lrs if len(scores.get((method, lr), [])) == most]
        best = max(full, key=lambda lr: statistics.mean(r["val_wrobust"] for r in scores[(method, lr)]))
        cells[lrs.index(best)] = f"**{cells[lrs.index(best)]}**"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tune_digits", help="folder for the runs")
    p.add_argument("--methods", default=",".join(m for m in method_names() if m != "natural"),
                   help="comma-separated methods")
    p.add_argument("--lrs", default="0.05,0.1,0.2,0.4,0.8", help="comma-separated learning rates")
    p.add_argument("--lrs-for", action="append", default=[], metavar="METHOD=LR,LR",
                   help="this method's learning rates instead of --lrs (repeatable)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "digits.md"), help="Markdown to update")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    out = Path(args.out)
    configs = quickstart_configs(QuickstartSettings(out=out, device=args.device, progress=False))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid = {m: [float(v) for v in args.lrs.split(",")] for m in methods}
    for item in args.lrs_for:
        method, _, values = item.partition("=")
        grid[method.strip()] = [float(v) for v in values.split(",")]
    methods = list(dict.fromkeys(methods + list(grid)))
    lrs = sorted({lr for values in grid.values() for lr in values})
    seeds = [int(s) for s in args.seeds.split(",")]
    for method in methods:
        get_method(method)
    workers, threads = parallel_plan(resolve_device(args.device), 2)
    teachers = [configs[n] for n in ("teacher_clean", "teacher_robust") if not (out / n / "result.json").exists()]
    run_jobs(train, teachers, min(workers, len(teachers)), threads)
    jobs = [(configs["student_bmtard"], m, lr, s, out) for s in seeds for m in methods for lr in grid[m]]
    machine = f"{cpu_cores()} CPU cores, {workers} run(s) at a time with {threads} thread(s) each, torch {torch.__version__}"
    for method, lr, seed, best, seconds in iter_jobs(run, jobs, workers, threads):
        print(f"{method} lr {lr:g} seed {seed}: val W-Robust {100 * best['val_wrobust']:.1f} "
              f"(clean {100 * best['val_clean']:.1f}, PGD-20 {100 * best['val_pgd20']:.1f}, epoch {best['epoch']}) "
              f"({seconds:.0f} s)", flush=True)
        section = (f"## Learning rates of the digits students (`python bench/tune_digits.py`)\n\n"
                   f"Validation W-Robust (PGD-20) at the best epoch, % (clean / PGD-20), mean over the seeds run "
                   f"(every run in {out}), on the 144 validation digits; MobileNetV2 (width 0.25) students, 20 "
                   f"epochs, eps 0.1, the quickstart's teachers; bold: the best lr per method among those with the "
                   f"most seeds; {machine}.\n\n{table(finished(out))}\n")
        write_results(Path(args.results), section, START, END)
    print(table(finished(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
