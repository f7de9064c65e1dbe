"""Replication on digits: the quickstart's teachers, every method, several seeds, full evaluation.

    python bench/replicate_digits.py                 # 7 methods x 5 seeds, writes docs/results/digits.md
    python bench/replicate_digits.py --methods bmtard,rslad --seeds 0

Students are the quickstart's MobileNetV2 (width 0.25) with its settings (digits 8x8, eps 0.1,
20 epochs); the method, its learning rate (``quickstart.DIGITS_LR``, chosen on the validation split
by bench/tune_digits.py) and the seed change. On a CPU, two runs go side by side in two processes
with one thread each (robustedge.runtime.parallel_plan), as in the quickstart. The teachers are
trained once (seed 0) and shared, as in the papers. Finished runs are skipped when the script is
started again, so an interrupted replication resumes where it stopped. Results: mean +- std over
seeds on the whole test split (359 digits; --n for fewer), and paired per-seed differences of
B-MTARD against MTARD and RSLAD with a 95% t-interval (which differences exceed seed noise),
written between markers in docs/results/digits.md and as JSON beside the runs.
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

from robustedge.weights import load_model
from robustedge.files import atomic_write_json, atomic_write_text
from robustedge.data import split_for_model
from robustedge.eval_report import DEFAULT_ATTACKS, parse_attacks
from robustedge.suite import evaluate
from robustedge.methods import get_method, method_names
from robustedge.quickstart import DIGITS_LR, QuickstartSettings, quickstart_configs
from robustedge.runtime import cpu_cores, iter_jobs, parallel_plan, resolve_device, run_jobs
from robustedge.trainer import train

START, END = "<!-- replicate_digits:start -->", "<!-- replicate_digits:end -->"


def run_student(base, method: str, seed: int, out: Path) -> Path:
    cfg = copy.deepcopy(base)
    cfg.name, cfg.method, cfg.seed, cfg.out_dir = f"{method}_s{seed}", method, seed, str(out)
    cfg.optim.lr = DIGITS_LR[method]
    if not get_method(method).teacher_roles:
        cfg.teachers = {}
    best = out / cfg.name / "best.safetensors"
    if not (out / cfg.name / "result.json").exists():
        if (out / cfg.name / "last.safetensors").exists():
            train(cfg, resume=True)
        else:
            train(cfg)
    return best


def quickstart_test_split(out: Path):
    """The whole test split the students are evaluated on (read from the clean teacher's metadata)."""
    _, meta = load_model(out / "teacher_clean" / "best.safetensors")
    return split_for_model(meta, None, None, "test", None)


def evaluate_run(best: Path, n: int, eps: float, attacks: list[str], seed: int) -> dict:
    cached = best.with_name("eval.json")
    if cached.exists():
        return json.loads(cached.read_text())
    model, meta = load_model(best)
    split = split_for_model(meta, None, None, "test", n)
    report = evaluate(model, split.float_images(), split.labels, attacks=attacks, eps=eps, batch_size=200,
                      seed=seed, show_progress=False, fold_bn=True)
    report.save(cached, best.with_name("eval.md"))
    return report.to_dict()


def run_and_evaluate(job: tuple) -> tuple[str, int, dict, float]:
    base, method, seed, out, n, eps, attacks = job
    start = time.perf_counter()
    best = run_student(base, method, seed, out)
    return method, seed, evaluate_run(best, n, eps, attacks, seed) | {"seed": seed}, time.perf_counter() - start


def table(results: dict[str, list[dict]], attacks: list[str]) -> str:
    head = "| method | " + " | ".join(attacks) + (" | W-Robust (AA)" if "autoattack" in attacks else "") + " |"
    lines = [head, "|---|" + "---:|" * (len(attacks) + ("autoattack" in attacks))]
    for method, runs in results.items():
        cells = []
        columns = [[100 * r["accuracy"][a] for r in runs] for a in attacks]
        if "autoattack" in attacks:
            columns.append([100 * r["w_robust"]["autoattack"] for r in runs])
        for values in columns:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PAIRS = (("bmtard", "mtard"), ("bmtard", "rslad"))


def paired(results: dict[str, list[dict]], seeds: list[int], attacks: list[str]) -> str:
    """Per-seed differences (first minus second method, same seed, same teachers): mean, std and the
    95% t-interval of the mean; an interval that excludes 0 is a difference beyond seed noise."""
    from scipy import stats

    columns = [a for a in ("clean", "pgd20", "autoattack") if a in attacks]
    head = "| difference | " + " | ".join(columns) + (" | W-Robust (AA)" if "autoattack" in attacks else "") + " |"
    lines = [head, "|---|" + "---:|" * (len(columns) + ("autoattack" in attacks))]
    for first, second in PAIRS:
        if first not in results or second not in results:
            continue
        by_seed = {name: {r["seed"]: r for r in results[name]} for name in (first, second)}
        common = [s for s in seeds if s in by_seed[first] and s in by_seed[second]]
        if len(common) < 2:
            continue
        cells = []
        getters = [lambda r, a=a: 100 * r["accuracy"][a] for a in columns]
        if "autoattack" in attacks:
            getters.append(lambda r: 100 * r["w_robust"]["autoattack"])
        for get in getters:
            d = [get(by_seed[first][s]) - get(by_seed[second][s]) for s in common]
            mean, sd = statistics.mean(d), statistics.stdev(d)
            half = stats.t.ppf(0.975, len(d) - 1) * sd / len(d) ** 0.5
            cells.append(f"{mean:+.1f} ± {sd:.1f} [{mean - half:+.1f}, {mean + half:+.1f}]")
        lines.append(f"| {first} - {second} ({len(common)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(path: Path, section: str, start: str = START, end: str = END) -> None:
    """Replace the block between the markers in ``path`` (or append it), atomically."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{section}{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate_digits", help="folder for the runs")
    p.add_argument("--methods", default=",".join(method_names()), help="comma-separated methods")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=QuickstartSettings.epochs, help="student epochs")
    p.add_argument("--n", type=int, default=None, help="test digits evaluated (default: all 359)")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="attacks of the evaluation")
    p.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "digits.md"), help="Markdown to update")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    out = Path(args.out)
    settings = QuickstartSettings(out=out, epochs=args.epochs, device=args.device, progress=False)
    configs = quickstart_configs(settings)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = parse_attacks(args.attacks)
    for method in methods:
        get_method(method)
    workers, threads = parallel_plan(resolve_device(args.device), 2)
    teachers = [configs[n] for n in ("teacher_clean", "teacher_robust") if not (out / n / "result.json").exists()]
    run_jobs(train, teachers, min(workers, len(teachers)), threads)
    # seeds outermost: after the first pass every method has a result
    jobs = [(configs["student_bmtard"], method, seed, out, args.n, settings.eps, attacks)
            for seed in seeds for method in methods]
    results: dict[str, list[dict]] = {}
    len_test = len(quickstart_test_split(out))
    machine = (f"{cpu_cores()} CPU cores, {workers} run(s) at a time with {threads} thread(s) each, "
               f"torch {torch.__version__}")
    for method, seed, result, seconds in iter_jobs(run_and_evaluate, jobs, workers, threads):
        results.setdefault(method, []).append(result)
        print(f"{method} seed {seed}: " + ", ".join(f"{a} {100 * result['accuracy'][a]:.1f}" for a in attacks)
              + f" ({seconds:.0f} s)", flush=True)
        atomic_write_json(out / "replication.json", {"methods": methods, "seeds": seeds, "n": args.n,
                                                     "eps": settings.eps, "results": results})
        section = (f"## Replication on digits (`python bench/replicate_digits.py`)\n\n"
                   f"MobileNetV2 (width 0.25) students on digits 8x8, eps = {settings.eps}, {args.epochs} epochs, "
                   f"teachers ResNet-20 (natural) and WRN-10-2 (TRADES) shared by all runs; seeds {args.seeds} "
                   f"(finished per method: {', '.join(f'{m} {len(r)}' for m, r in results.items())}); "
                   f"learning rates {', '.join(f'{m} {DIGITS_LR[m]:g}' for m in methods)} (bench/tune_digits.py); "
                   f"accuracy (%) on {'all ' + str(len_test) if args.n is None else 'the first ' + str(args.n)} "
                   f"test digits (attacks on the conv+BN-folded student), mean ± std over the finished seeds; "
                   f"{machine}.\n\n{table(results, attacks)}\n"
                   f"Paired per-seed differences (percentage points; mean ± std [95% t-interval]):\n\n"
                   f"{paired(results, seeds, attacks)}\n")
        write_results(Path(args.results), section)
    print(table(results, attacks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
