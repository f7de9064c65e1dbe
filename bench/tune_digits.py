"""Learning-rate search for the digits students, on the validation split only (never the test set).

    python bench/tune_digits.py                                   # every method, lr 0.05..0.8, seeds 0,1
    python bench/tune_digits.py --methods bmtard,rslad --lrs 0.1,0.2 --seeds 0

The quickstart's MobileNetV2 (width 0.25) student with its settings (digits 8x8, eps 0.1, 20 epochs,
the quickstart's teachers, trained once and shared); only the method, the learning rate (milestones
stay at 75% and 90% of the epochs) and the seed change. The score is what the trainer selects
checkpoints by: validation W-Robust = (clean + PGD-20) / 2 on the 144 held-out validation digits, at
the best epoch. Why it exists: the distillation losses now follow their authors' reduction (the KL
averaged over batch x classes, 10x smaller on 10 classes than before), so the old learning rate no
longer meant the same step. Finished runs are skipped when started again. Results go between markers
in bench/RESULTS.md.
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

from robustedge.files import atomic_write_text
from robustedge.methods import get_method, method_names
from robustedge.quickstart import QuickstartSettings, quickstart_configs
from robustedge.runtime import cpu_cores, iter_jobs, parallel_plan, resolve_device, run_jobs
from robustedge.train import train

START, END = "<!-- tune_digits:start -->", "<!-- tune_digits:end -->"


def run(job: tuple) -> tuple[str, float, int, dict, float]:
    base, method, lr, seed, out = job
    cfg = copy.deepcopy(base)
    cfg.name, cfg.method, cfg.seed, cfg.out_dir = f"{method}_lr{lr:g}_s{seed}", method, seed, str(out)
    cfg.optim.lr = lr
    if not get_method(method).teacher_roles:
        cfg.teachers = {}
    result_file = out / cfg.name / "result.json"
    start = time.perf_counter()
    if not result_file.exists():
        train(cfg, resume=(out / cfg.name / "last.safetensors").exists())
    result = json.loads(result_file.read_text())
    best = max(result["history"], key=lambda row: row.get("val_wrobust", float("-inf")))
    return method, lr, seed, best, time.perf_counter() - start


def table(scores: dict[tuple[str, float], list[dict]], methods: list[str], lrs: list[float]) -> str:
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for method in methods:
        cells = []
        for lr in lrs:
            rows = scores.get((method, lr), [])
            if not rows:
                cells.append("")
                continue
            w = statistics.mean(100 * r["val_wrobust"] for r in rows)
            c = statistics.mean(100 * r["val_clean"] for r in rows)
            p = statistics.mean(100 * r["val_pgd20"] for r in rows)
            cells.append(f"{w:.1f} ({c:.0f} / {p:.0f})")
        best = max((lr for lr in lrs if scores.get((method, lr))),
                   key=lambda lr: statistics.mean(r["val_wrobust"] for r in scores[(method, lr)]), default=None)
        if best is not None:
            i = lrs.index(best)
            cells[i] = f"**{cells[i]}**"
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tune_digits", help="folder for the runs")
    p.add_argument("--methods", default=",".join(m for m in method_names() if m != "natural"),
                   help="comma-separated methods")
    p.add_argument("--lrs", default="0.05,0.1,0.2,0.4,0.8", help="comma-separated learning rates")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")), help="Markdown to update")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    out = Path(args.out)
    configs = quickstart_configs(QuickstartSettings(out=out, device=args.device, progress=False))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for method in methods:
        get_method(method)
    workers, threads = parallel_plan(resolve_device(args.device), 2)
    teachers = [configs[n] for n in ("teacher_clean", "teacher_robust") if not (out / n / "result.json").exists()]
    run_jobs(train, teachers, min(workers, len(teachers)), threads)
    jobs = [(configs["student_bmtard"], m, lr, s, out) for s in seeds for m in methods for lr in lrs]
    scores: dict[tuple[str, float], list[dict]] = {}
    machine = f"{cpu_cores()} CPU cores, {workers} run(s) at a time with {threads} thread(s) each, torch {torch.__version__}"
    for method, lr, seed, best, seconds in iter_jobs(run, jobs, workers, threads):
        scores.setdefault((method, lr), []).append(best)
        print(f"{method} lr {lr:g} seed {seed}: val W-Robust {100 * best['val_wrobust']:.1f} "
              f"(clean {100 * best['val_clean']:.1f}, PGD-20 {100 * best['val_pgd20']:.1f}, epoch {best['epoch']}) "
              f"({seconds:.0f} s)", flush=True)
        section = (f"## Learning rates of the digits students (`python bench/tune_digits.py`)\n\n"
                   f"Validation W-Robust (PGD-20) at the best epoch, % (clean / PGD-20), mean over seeds {args.seeds}, "
                   f"on the 144 validation digits; MobileNetV2 (width 0.25) students, 20 epochs, eps 0.1, the "
                   f"quickstart's teachers; bold: the best lr per method; {machine}.\n\n"
                   f"{table(scores, methods, lrs)}\n")
        write_results(Path(args.results), section)
    print(table(scores, methods, lrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
