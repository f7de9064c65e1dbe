"""``robustedge quickstart``: the whole story on the embedded digits data, offline, on a laptop CPU.

1. a clean teacher (natural training) and a robust teacher (TRADES);
2. a MobileNetV2 student distilled from both with B-MTARD, and the same student trained with
   plain PGD-AT as the baseline;
3. both students through the full robustness suite on the test split;
4. the B-MTARD student exported to ONNX fp32 / fp16 / INT8 and re-verified on each artifact through
   ONNX Runtime (transfer PGD-20 and AutoAttack examples, black-box Square on the runtime);
   a table, the report (``report/report.html``) and the folder;
5. with ``--qat``: a quantization-aware fine-tune of the B-MTARD student (same method, a few epochs),
   exported straight to INT8 and attacked white-box through its twin like the PTQ file, and float /
   PTQ INT8 / QAT INT8 side by side. Off by default: the fine-tune and the white-box attacks on its
   INT8 file add minutes to a job of 8 to 14 on two CPU cores (docs/results/quickstart.md).

On a CPU, the teachers, then the students, then the two evaluations run side by side in two
processes with one thread each (robustedge.runtime.parallel_plan): models this small are bound by
per-operator overhead, so two single-thread runs finish in about the time of one two-thread run.
Students train for 20 epochs: at 10, adversarial training of this tiny student failed to take off
for some seeds (bench/RESULTS.md).

Digits are used at their native 8x8, one channel: upscaling adds no information but costs 2-4x
in every forward pass, and AutoAttack's cost is all forward passes. eps = 0.1 (25.5/255): at 8/255
nearly any model is robust on these blurry, high-contrast images and methods cannot be told
apart, while much above 0.1 the PGD-AT student's clean accuracy collapses. Flips are off (a
mirrored 2 is not a 2) and the crop padding is 1 pixel (the CIFAR 4 at a quarter of the size).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import torch

from robustedge.loading import load
from robustedge.config import TrainConfig, load_config, resolve_recipe, validate_config
from robustedge.errors import RobustEdgeError, exception_line
from robustedge.eval_report import DEFAULT_ATTACKS, EvalReport, parse_attacks
from robustedge.suite import evaluate
from robustedge.files import (OutputKind, atomic_write_json, atomic_write_text, check_output_folder, read_json,
                              writer_alive, writer_identity)
from robustedge.flags import FlagSettings
from robustedge.options import parse_eps, parse_int, parse_seed
from robustedge.qat_recipe import fine_tune_config
from robustedge.runtime import parallel_plan, resolve_device, run_jobs, worker_pool
from robustedge.trainer import train

DIGITS_EPS = 0.1
# the students' learning rate per method, chosen on the validation split by bench/tune_digits.py
# (bench/RESULTS.md, "Learning rates of the digits students"); the teachers train at 0.05. The quickstart's own
# runs read theirs from configs/digits_*.yaml (a test keeps the two equal); bench/replicate_digits.py reads this.
DIGITS_LR = {"natural": 0.05, "pgd_at": 0.025, "trades": 0.025, "ard": 0.8, "rslad": 0.4, "mtard": 1.6,
             "bmtard": 0.8}
MARKER = "quickstart.json"
STUDENTS = ("student_bmtard", "student_pgd_at")  # evaluated and compared, in this order


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    epochs: int = 20
    teacher_epochs: int = 10
    eval_n: int = 200
    eps: float = DIGITS_EPS
    device: str = "auto"
    seed: int = 0
    attacks: tuple[str, ...] = tuple(DEFAULT_ATTACKS)
    progress: bool = True
    export: bool = True
    square_queries: int = 1000  # the black-box check's budget here; `robustedge export` defaults to 5000
    qat: bool = False
    qat_epochs: int | None = None  # None: the QAT recipe's share of the student's epochs
    train_n: int | None = None  # every run on a seeded random N of the training digits (None: all): a quick check


RUNS = ("teacher_clean", "teacher_robust", "student_bmtard", "student_pgd_at")  # trained in this order
QAT_RUN = "student_bmtard_qat"  # with --qat, after them


def _from_recipe(name: str, epochs: int, s: QuickstartSettings) -> TrainConfig:
    """The shipped ``configs/digits_<name>.yaml`` (the one place the quickstart's recipe is written: method,
    model, learning rate, data), with what the quickstart's flags set: epochs and the schedule that scales
    with them (milestones at 75% and 90%, five validations), eps and its step (eps/4), seed, device, folder."""
    cfg = load_config(resolve_recipe(f"digits_{name}"))
    cfg.epochs, cfg.eval_every = epochs, max(1, epochs // 5)
    cfg.optim.milestones = [int(epochs * 0.75), int(epochs * 0.9)]
    cfg.attack.eps, cfg.attack.step_size = s.eps, s.eps / 4
    cfg.seed, cfg.device, cfg.out_dir, cfg.progress = s.seed, s.device, str(s.out), s.progress
    cfg.data.train_n = s.train_n
    for role, teacher in cfg.teachers.items():
        teacher.checkpoint = str(s.out / f"teacher_{role}" / "best.safetensors")
    return cfg


def quickstart_configs(s: QuickstartSettings) -> dict[str, TrainConfig]:
    """The runs, in order (four; five with QAT), read from the shipped digits recipes."""
    runs = [_from_recipe(name, s.teacher_epochs if name.startswith("teacher") else s.epochs, s) for name in RUNS]
    if s.qat:  # the B-MTARD student's fine-tune under the measured QAT recipe (robustedge/qat_recipe.py)
        student = next(c for c in runs if c.name == "student_bmtard")
        runs.append(fine_tune_config(student, s.out / "student_bmtard" / "best.safetensors", epochs=s.qat_epochs,
                                     state_beside=True))
    return {c.name: c for c in runs}


QUICKSTART_FORMAT = "robustedge-quickstart/1"


def _legacy_marker(folder: Path) -> bool:  # quickstart folders written before the marker had a format key
    try:
        return "status" in json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False


QUICKSTART = OutputKind("quickstart folder", MARKER, QUICKSTART_FORMAT, legacy=_legacy_marker)


def read_marker(out: Path) -> dict:
    """The quickstart marker; a ``running`` marker whose process is gone reads as ``interrupted``."""
    marker = read_json(out / MARKER)
    if not isinstance(marker, dict):
        raise RobustEdgeError(f"{out / MARKER} is not a quickstart marker")
    writer = marker.get("writer")
    if marker.get("status") == "running" and isinstance(writer, dict) and \
            not writer_alive(str(writer.get("host")), int(writer.get("pid", 0)), int(writer.get("start", 0))):
        marker = marker | {"status": "interrupted"}
    return marker


def _check_out(out: Path) -> None:
    """May ``out`` be (re)made? Only if new, empty, or a previous quickstart nobody is still writing."""
    check_output_folder(out, QUICKSTART, replace=True)
    if (out / MARKER).is_file() and QUICKSTART.owns(out) and read_marker(out).get("status") == "running":
        raise RobustEdgeError(f"{out} is being written by a quickstart that is still running "
                              f"(pid {read_marker(out)['writer']['pid']}); wait for it or choose another --out")


def _mark(out: Path, status: str, **fields) -> None:
    atomic_write_json(out / MARKER, {"format": QUICKSTART_FORMAT, "status": status, "writer": writer_identity(),
                                     **fields})


@contextlib.contextmanager
def _marked(out: Path):
    """Say ``running`` while the block runs and ``failed``/``interrupted`` if it does not finish;
    SIGTERM is turned into an interruption so the marker never outlives its process claiming to run."""
    def on_term(signum, frame):
        raise KeyboardInterrupt()

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    _mark(out, "running")
    try:
        yield
    except KeyboardInterrupt:
        _mark(out, "interrupted")
        raise
    except BaseException as exc:
        _mark(out, "failed", error=exception_line(exc))
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def validate_settings(s: QuickstartSettings) -> dict[str, TrainConfig]:
    """Every setting checked before the quickstart touches disk; returns the four run configs."""
    for name in ("epochs", "teacher_epochs", "eval_n"):
        parse_int(getattr(s, name), name.replace("_", "-"), 1)
    for name in ("qat_epochs", "train_n"):  # None: the QAT recipe's epochs; all the training digits
        if getattr(s, name) is not None:
            parse_int(getattr(s, name), name.replace("_", "-"), 1)
    parse_seed(s.seed)
    parse_eps(s.eps)
    parse_int(s.square_queries, "square-queries", 1)
    parse_attacks(list(s.attacks))
    resolve_device(s.device)
    if s.qat and not s.export:
        raise RobustEdgeError("--qat compares exported INT8 artifacts; it cannot be combined with --no-export")
    configs = quickstart_configs(s)
    for cfg in configs.values():
        if cfg.qat.enabled:  # the float student it starts from (and its state) is trained by this very quickstart
            cfg = copy.deepcopy(cfg)
            cfg.qat.from_checkpoint, cfg.qat.carry_method_state, cfg.qat.float_teacher = None, False, 0.0
            cfg.qat.disagreement = 0.0
        validate_config(cfg)
    _check_out(s.out)
    return configs


ADVERSARIAL_FILE = "eval_adversarial.safetensors"  # the evaluation's adversarial examples, reused by the export


def _train_job(cfg: TrainConfig) -> float:
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def _eval_job(job: tuple[QuickstartSettings, str]) -> dict:
    """Evaluate one student; writes eval.json/.md (and the adversarial examples of the B-MTARD one)."""
    s, name = job
    from robustedge.data import split_for_model
    from robustedge.files import save_safetensors

    model, meta = load(s.out / name / "best.safetensors", device="cpu")
    split = split_for_model(meta, None, None, "test", s.eval_n)
    print(f"== evaluating {name} on {len(split)} test digits, eps={s.eps} ==", flush=True)
    keep = name == "student_bmtard"  # the exported student: its adversarial examples are reused
    adversarial: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    report = evaluate(model, split.float_images(), split.labels, attacks=list(s.attacks), eps=s.eps,
                      batch_size=200, seed=s.seed, show_progress=s.progress, fold_bn=True,
                      adversarial_out=adversarial if keep else None, flags=FlagSettings())
    seconds = time.perf_counter() - t0
    report.info |= {"checkpoint": str(s.out / name / "best.safetensors"), "method": meta.method}
    report.save(s.out / name / "eval.json", s.out / name / "eval.md")
    if adversarial:
        save_safetensors(s.out / name / ADVERSARIAL_FILE,
                         {k: v.detach().cpu().contiguous() for k, v in adversarial.items()})
    print(f"== {name} evaluated in {seconds:.0f} s ==", flush=True)
    return {"report": report.to_dict(), "seconds": seconds}


def _export_options(s: QuickstartSettings, transfer: tuple[str, ...], **overrides):
    from robustedge.edge.bundle import ExportOptions

    return ExportOptions(n=s.eval_n, transfer_attacks=transfer, square_n=100, square_queries=s.square_queries,
                         seed=s.seed, whitebox_attacks=_whitebox_attacks(s), **overrides)


def _whitebox_attacks(s: QuickstartSettings) -> tuple[str, ...]:
    """The white-box attacks on each INT8 file: those of the evaluation (``--attacks``) that have a
    white-box form, and DIVA, which exists only for a quantised model. With the default attacks that is
    every white-box attack; a shorter ``--attacks`` shortens the export's verification the same way."""
    from robustedge.edge.verify import WHITEBOX_ATTACKS

    return tuple(a for a in WHITEBOX_ATTACKS if a in s.attacks or a == "diva")


def _export_float(s: QuickstartSettings) -> dict:
    """The B-MTARD student to ONNX fp32 / fp16 / INT8 (PTQ), verified; reuses its evaluation's examples."""
    from safetensors.torch import load_file

    from robustedge.edge.bundle import export_bundle

    adversarial: dict[str, torch.Tensor] = {}
    if (s.out / "student_bmtard" / ADVERSARIAL_FILE).exists():
        adversarial = load_file(str(s.out / "student_bmtard" / ADVERSARIAL_FILE))
    print("\n== exporting student_bmtard to ONNX fp32 / fp16 / INT8 and re-verifying ==", flush=True)
    t0 = time.perf_counter()
    attacks = tuple(a for a in ("pgd20", "autoattack") if a in adversarial)
    manifest, failures = export_bundle(s.out / "student_bmtard" / "best.safetensors", s.out / "student_bmtard_export",
                                       _export_options(s, attacks), progress=lambda m: print(m, flush=True),
                                       precomputed_adv=adversarial)
    return {"manifest": manifest, "failures": failures, "seconds": time.perf_counter() - t0}


def _qat_job(job: tuple[QuickstartSettings, TrainConfig]) -> dict:
    """Fine-tune the B-MTARD student as its INT8 function, export it to INT8 with its learned scales and
    attack that file white-box through its twin. The bundle's reference row (the fake-quantised torch
    model) gets the same transfer attacks as the float bundle's (those of the evaluation among PGD-20 and
    AutoAttack): the gate compares worst cases, and a reference attacked more weakly would fail it for
    the wrong reason."""
    s, cfg = job
    from robustedge.edge.bundle import export_bundle

    print(f"\n== QAT: fine-tuning student_bmtard as its INT8 function, {cfg.epochs} epochs ==", flush=True)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = {"train": time.perf_counter() - t0}
    t0 = time.perf_counter()
    manifest, failures = export_bundle(result.last_path, s.out / "student_bmtard_qat_export",
                                       _export_options(s, tuple(a for a in ("pgd20", "autoattack") if a in s.attacks),
                                                       formats=["onnx-int8"]),
                                       progress=lambda m: print(f"[qat] {m}", flush=True))
    seconds["export"] = time.perf_counter() - t0
    return {"manifest": manifest, "failures": failures, "seconds": seconds}


def _curve_n(s: QuickstartSettings) -> int:
    """The report's eps curves use at most the final evaluation's examples (100 at the default 200)."""
    return min(100, s.eval_n)


def _collect_job(job: tuple[QuickstartSettings, list[str]]) -> list:
    """Read runs for the report (eps curve, latency) in a worker, beside the other chain's work."""
    s, names = job
    from robustedge.report import collect

    return [collect(s.out / name, _curve_n(s)) for name in names]


def _chain_job(steps: list[tuple]) -> list:
    """Several jobs one after another in one worker (module-level, so a spawned process can run it)."""
    return [fn(arg) for fn, arg in steps]


def _phase(title: str, fn, items: list, workers: int, threads: int, pool: Executor | None) -> list:
    mode = f" ({workers} processes x {threads} thread{'s' if threads > 1 else ''})" if workers > 1 else ""
    print(f"\n== {title}{mode} ==", flush=True)
    return run_jobs(fn, items, workers, threads, pool)


def run_quickstart(s: QuickstartSettings) -> dict:
    configs = validate_settings(s)
    if s.out.exists():
        shutil.rmtree(s.out)  # a previous quickstart's folder (checked above)
    s.out.mkdir(parents=True)
    with _marked(s.out):
        return _run(s, configs)


@dataclass
class _WorkerResults:
    """What the phases run in worker processes hand back to the main process."""
    timings: dict
    evaluated: list  # the two students' evaluation results, B-MTARD first
    exported: dict | None = None  # the float bundle, when a worker exported it (with --qat)
    qat: dict | None = None
    collected: list | None = None  # runs read for the report by the workers (with --qat)


def _run(s: QuickstartSettings, configs: dict[str, TrainConfig]) -> dict:
    start = time.perf_counter()
    workers, threads = parallel_plan(resolve_device(s.device), 2)  # workers run without bars (runtime.py)
    with worker_pool(workers, threads) as pool:  # started once for every phase, gone before the work below
        done = _worker_phases(s, configs, workers, threads, pool)
    if done.exported is None and s.export:  # without --qat the float export runs here, on every core
        done.exported = _export_float(s)
    return _finish(s, start, done)


def _worker_phases(s: QuickstartSettings, configs: dict[str, TrainConfig], workers: int, threads: int,
                   pool: Executor | None) -> _WorkerResults:
    timings = {}
    for names in (("teacher_clean", "teacher_robust"), ("student_bmtard", "student_pgd_at")):
        title = "; ".join(f"{n}: {configs[n].method} {configs[n].model.arch} (width {configs[n].model.width}), "
                          f"{configs[n].epochs} epochs" for n in names)
        seconds = _phase(f"training {title}", _train_job, [configs[n] for n in names], workers, threads,
                         pool)
        timings |= dict(zip(names, seconds))
    if not s.qat:
        evaluated = _phase("evaluating both students with the full suite", _eval_job,
                           [(s, n) for n in STUDENTS], workers, threads, pool)
        return _WorkerResults(timings, evaluated)
    # two chains side by side, each reading its runs for the report once it is done with them
    floats = ["teacher_clean", "teacher_robust", "student_bmtard", "student_pgd_at"]
    chains = [[(_eval_job, (s, "student_bmtard")), (_export_float, s), (_eval_job, (s, "student_pgd_at")),
               (_collect_job, (s, floats))],
              [(_qat_job, (s, configs["student_bmtard_qat"])), (_collect_job, (s, ["student_bmtard_qat"]))]]
    (evaluated_b, exported, evaluated_p, collected_a), (qat, collected_b) = _phase(
        "evaluating both students and exporting the B-MTARD one (PTQ INT8) | fine-tuning it with QAT and "
        "exporting it (QAT INT8)", _chain_job, chains, workers, threads, pool)
    timings |= {"qat_train": qat["seconds"]["train"], "qat_export": qat["seconds"]["export"]}
    return _WorkerResults(timings, [evaluated_b, evaluated_p], exported, qat, collected_a + collected_b)


def _finish(s: QuickstartSettings, start: float, done: _WorkerResults) -> dict:
    """Tables, the report, quickstart.md and the marker, from what the phases produced."""
    timings, evaluated, exported, qat = done.timings, done.evaluated, done.exported, done.qat
    reports: dict[str, EvalReport] = {}
    for name, result in zip(STUDENTS, evaluated):
        reports[name] = EvalReport.from_dict(result["report"])
        timings[f"eval_{name}"] = result["seconds"]

    export_table, gate_failures, int8_table = "", [], ""
    if exported is not None:
        from robustedge.verifier import format_flags, format_table

        manifest, gate_failures = exported["manifest"], exported["failures"]
        timings["export"] = exported["seconds"]
        export_table = format_table(manifest["table"]) + "\n" + format_flags(manifest["flags"])
        if qat is not None:
            int8_table = int8_comparison(manifest, qat["manifest"])

    t0 = time.perf_counter()
    from robustedge.report import build_report

    report_page = build_report([s.out], s.out / "report", curve_n=_curve_n(s), progress=lambda m: None,
                               collected=done.collected)
    timings["report"] = time.perf_counter() - t0
    total = time.perf_counter() - start
    table = comparison_table(reports)
    summary = {"format": QUICKSTART_FORMAT, "status": "done", "writer": writer_identity(), "seconds": total,
               "timings": timings, "eps": s.eps, "eval_n": s.eval_n, "train_n": s.train_n,
               "results": {k: r.to_dict() for k, r in reports.items()}, "export_gate_failures": gate_failures}
    if qat is not None:
        summary["qat_gate_failures"] = qat["failures"]
    atomic_write_text(s.out / "quickstart.md", f"# Quickstart results (digits, eps = {s.eps})\n\n{table}\n"
                                                + (f"## Exported B-MTARD student\n\n{export_table}\n" if export_table
                                                   else "")
                                                + (f"## Float vs PTQ INT8 vs QAT INT8\n\n{int8_table}\n" if int8_table
                                                   else "") + f"Total time: {total:.0f} s\n")
    atomic_write_json(s.out / MARKER, summary)
    print("\n" + table)
    if export_table:
        print("exported B-MTARD student, verified through ONNX Runtime (accuracy in %):\n" + export_table)
        print("export gate: " + ("passed" if not gate_failures else "FAILED: " + "; ".join(gate_failures)))
    if int8_table:
        print("\nthe B-MTARD student as float, post-training INT8 and quantization-aware INT8 (accuracy in %; "
              "INT8 attacked white-box through each file's twin, worst case over every attack):\n" + int8_table)
        print("QAT export gate: " + ("passed" if not qat["failures"] else "FAILED: " + "; ".join(qat["failures"])))
    print(f"report: {report_page}")
    print(f"quickstart finished in {total:.0f} s ({total / 60:.1f} min); outputs in {s.out.resolve()}")
    sys.stdout.flush()
    return summary


def int8_comparison(float_manifest: dict, qat_manifest: dict) -> str:
    """Float / PTQ INT8 / QAT INT8 side by side, from the two bundles' verification tables. An AutoAttack
    cell is empty for a reason: the attack was not asked for (``--attacks`` without it), or an INT8
    file's twin was refused, so no white-box attack ran on it."""
    rows = [("float (torch)", float_manifest, "torch", "transfer"),
            ("PTQ INT8 (onnx-int8)", float_manifest, "onnx-int8", "whitebox"),
            ("QAT INT8 (onnx-int8)", qat_manifest, "onnx-int8", "whitebox")]
    lines = ["| model | clean | AutoAttack | worst case | size (MB) | latency b1 (ms) |", "|---|---:|---:|---:|---:|---:|"]
    for label, manifest, fmt, kind in rows:
        row = manifest["table"].get(fmt)
        if row is None:
            continue
        if f"{kind}_autoattack" in row:
            cell = f"{100 * row[f'{kind}_autoattack']:.1f}"
        elif "autoattack" not in manifest["options"][f"{kind}_attacks"]:
            cell = "not run (--attacks)"
        else:  # asked for, yet missing: only a refused twin stops a white-box attack
            cell = "n/a (twin refused)"
        lines.append(f"| {label} | {100 * row['clean']:.1f} | {cell} | {100 * row['worst']:.1f} | "
                     f"{row['size_mb']:.3f} | {row['latency_b1_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def comparison_table(reports: dict[str, EvalReport]) -> str:
    names = list(reports)
    attacks = list(next(iter(reports.values())).accuracy)
    lines = ["| attack | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for attack in attacks:
        cells = [f"{100 * reports[n].accuracy[attack]:.1f}" for n in names]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    if all(r.worst is not None for r in reports.values()):
        lines.append("| worst case | " + " | ".join(f"{100 * reports[n].worst:.1f}" for n in names) + " |")
    if "autoattack" in attacks:
        lines.append("| W-Robust (AA) | " + " | ".join(f"{100 * reports[n].w_robust('autoattack'):.1f}"
                                                     for n in names) + " |")
    lines.append("| attack-failure flags | " + " | ".join(
        ", ".join(f["check"] for f in reports[n].flags) or "none" if reports[n].flags is not None else "not checked"
        for n in names) + " |")
    return "\n".join(lines) + "\n"


