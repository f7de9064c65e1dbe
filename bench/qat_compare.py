"""Float vs post-training INT8 vs quantization-aware INT8, measured on the INT8 artifacts themselves.

    python bench/qat_compare.py digits --teachers runs/quickstart --seeds 0 1 2 3 4 --n 359 --out runs/qat26
    python bench/qat_compare.py digits ... --qat-epochs 3 --qat-lr 0.002 --qat-schedule piecewise \
        --freeze-epochs 0 --no-carry-method-state --float-teacher 0      # the recipe before issue 26
    python bench/qat_compare.py digits --teachers runs/quickstart --seeds 4 0 --n 359 --out runs/qat26 --control
    python bench/qat_compare.py digits --teachers runs/quickstart --seeds 4 0 --n 359 --out runs/qat26 --disagreement 1
    python bench/qat_compare.py config bench/configs/mnv2_32.yaml --seeds 0 1 2 3 4 --n 48 --square-n 48 \
        --out runs/qat_mnv2_32 --qat-transfer pgd20 --control
    python bench/qat_compare.py run runs/mnv2_32/mnv2_32_s0 runs/mnv2_32/mnv2_32_s1 --n 48 --out runs/qat_mnv2_32

``digits``: the quickstart's B-MTARD student (its teachers, its settings) trained once per seed;
``config``: any training config (a YAML file, or a recipe shipped with RobustEdge) trained once per
seed, as ``<config name>_s<seed>`` in --out (``bench/configs/mnv2_32.yaml``: the full-width 32x32
MobileNetV2 of docs/results/qat.md);
``run``: existing training run folders, e.g. one per seed (each with its config.yaml and
best.safetensors). Then, for each:
1. the float student exported with post-training INT8 (``onnx-int8``, min-max calibration), once by
   onnxruntime's quantizer and once by the PT2E quantizer QAT trains under (``--int8-quantizer pt2e``:
   the QAT file of zero epochs, the fair baseline);
2. a QAT fine-tune of the float student with the run's own method (ranges calibrated first, so it
   starts from the PTQ model), under the QAT recipe ``distill --qat-from`` runs (robustedge/qat_recipe.py)
   with the fields the flags set instead, exported straight to INT8;
3. both INT8 files attacked white-box through their twins (PGD-20, CW-inf, AutoAttack, DIVA) and
   black-box (Square) on ONNX Runtime; the headline is the per-example worst case over every attack.
With ``--control``, 4. the same fine-tune in float (``qat.float_control``: same start, schedule, carried
method state and float teacher, no fake quantisers) and its onnxruntime PTQ file, attacked alike: what the
extra training alone buys, so that QAT's gain is not mistaken for it.
The float row is the torch model under AutoAttack (its white-box figure). Also compares the median
training speed (img/s) of the float run and of the QAT fine-tune. Results go to
``<out>/qat_compare_<recipe>.json`` and ``.md`` (the recipe's tag, e.g. ``e6_lr0.08_cosine_freeze2_carry_ft1``), with the
paired per-seed differences; the QAT run's folder carries the same tag, so several recipes run into one
``--out`` share the float students and the PTQ files.
On a CPU, seeds run side by side in two processes with one thread each, as in the quickstart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
from pathlib import Path

from robustedge.checkpoint import read_meta
from robustedge.config import TrainConfig, load_config
from robustedge.edge.bundle import ExportOptions, export_bundle
from robustedge.errors import RobustEdgeError
from robustedge.files import atomic_write_json, atomic_write_text
from robustedge.options import parse_seed
from robustedge.qat_recipe import fine_tune_config, float_control_config
from robustedge.quickstart import QuickstartSettings, quickstart_configs
from robustedge.runtime import parallel_plan, resolve_device, run_jobs
from robustedge.trainer import train


def _train_once(cfg: TrainConfig) -> tuple[Path, float, float]:
    """Train (or reuse) a run; returns (best checkpoint, training images per second over the run, the run's
    own training seconds from its result.json: a reused run's too, not the moment this call spent reading
    it; for a resumed run, its last session's)."""
    folder = Path(cfg.out_dir) / cfg.name
    if not (folder / "result.json").exists():
        train(cfg)
    elif dataclasses.replace(load_config(folder / "config.yaml"), device=cfg.device) != cfg:
        # a finished run is reused only if it is this very run (wherever it ran)
        raise SystemExit(f"{folder} holds another run than the one asked for (its config.yaml differs); "
                         f"use another --out")
    seconds = float(json.loads((folder / "result.json").read_text())["seconds"])
    return folder / "best.safetensors", _images_per_second(folder), seconds


def _images_per_second(folder: Path) -> float:
    import csv

    with open(folder / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return statistics.median(float(r["img_per_s"]) for r in rows if r.get("img_per_s"))


def _export(checkpoint: Path, out: Path, n: int, transfer: tuple[str, ...], square_n: int, seed: int,
            whitebox: tuple[str, ...], device: str, quantizer: str = "onnxruntime") -> dict:
    if not (out / "manifest.json").exists():
        export_bundle(checkpoint, out, ExportOptions(formats=["onnx-int8"], n=n, transfer_attacks=transfer,
                                                     whitebox_attacks=whitebox, square_n=square_n,
                                                     square_queries=1000, seed=seed, int8_quantizer=quantizer),
                      progress=lambda m: None, force=out.exists(), device=device)
    return json.loads((out / "manifest.json").read_text())


def compare(job: dict) -> dict:
    """One float student: its PTQ INT8 and QAT INT8 artifacts, measured."""
    base: TrainConfig = job["config"]
    out = Path(job["out"])
    best, float_speed, float_seconds = _train_once(base)
    n, seed, square_n = job["n"], base.seed, job["square_n"]
    ptq = _export(best, out / f"{base.name}_ptq", n, ("pgd20", "autoattack"), square_n, seed, job["whitebox"], job["device"])
    if job["float_only"]:
        return {"name": base.name, "seed": seed}
    # the fair baseline: the QAT quantizer itself, calibrated, no training (the QAT file of zero epochs)
    pt2e = _export(best, out / f"{base.name}_pt2e_ptq", n, ("pgd20",), square_n, seed, job["whitebox"], job["device"], "pt2e")

    qat = copy.deepcopy(job["qat_config"])  # the recipe's fine-tune of this float run (main)
    _, qat_speed, qat_seconds = _train_once(qat)
    # the reference row (the fake-quantised torch model) gets the same transfer attacks as the float
    # bundle's, so the two bundles' worst cases and gates compare like with like
    qat_bundle = _export(Path(qat.out_dir) / qat.name / "last.safetensors", out / f"{qat.name}_export", n,
                         job["qat_transfer"], square_n, seed, job["whitebox"], job["device"])

    result = {"name": base.name, "seed": seed, "variant": job["tag"], "float": float_row(ptq),
              "ptq_int8": int8_row(ptq), "pt2e_ptq_int8": int8_row(pt2e), "qat_int8": int8_row(qat_bundle),
              "qat_patterns": read_meta(Path(qat.out_dir) / qat.name / "last.safetensors").extra["qat"].get("patterns"),
              "qat_parity": qat_bundle["parity"], "flags": {"ptq": ptq["flags"], "qat": qat_bundle["flags"]},
              "train": {"float_img_per_s": float_speed, "qat_img_per_s": qat_speed,
                        "float_seconds": float_seconds, "qat_seconds": qat_seconds, "qat_epochs": qat.epochs}}
    if job["control"]:  # the same fine-tune in float, then post-training INT8: what the extra training alone buys
        control = float_control_config(qat)
        # named by the QAT recipe it controls, less the disagreement term it drops: a variant of the recipe
        # with that term alone shares the recipe's control
        tagged = copy.deepcopy(qat)
        tagged.qat.disagreement = 0.0
        control.name = f"{qat.name.rpartition('_qat_')[0]}_float_control_{recipe_tag(tagged)}"
        _, control_speed, control_seconds = _train_once(control)
        result["train"] |= {"control_img_per_s": control_speed, "control_seconds": control_seconds}
        bundle = _export(Path(control.out_dir) / control.name / "last.safetensors", out / f"{control.name}_ptq", n,
                         ("pgd20", "autoattack"), square_n, seed, job["whitebox"], job["device"])
        result["control_float"], result["control_ptq_int8"] = float_row(bundle), int8_row(bundle)
    return result


def float_row(manifest: dict) -> dict:
    """The torch model of a PTQ bundle: its white-box figure is transfer AutoAttack (the source is the model)."""
    row = manifest["table"]["torch"]
    return {"clean": row["clean"], "autoattack": row["transfer_autoattack"], "worst": row["worst"],
            "size_mb": row["size_mb"], "latency_b1_ms": row["latency_b1_ms"], "latency_b64_ms": row["latency_b64_ms"]}


def int8_row(manifest: dict) -> dict:
    row = manifest["table"]["onnx-int8"]
    # no white-box figure when the twin was refused (agreement with the runtime below the gate's)
    return {"clean": row["clean"], "autoattack": row.get("whitebox_autoattack"), "worst": row["worst"],
            "size_mb": row["size_mb"], "latency_b1_ms": row["latency_b1_ms"],
            "latency_b64_ms": row["latency_b64_ms"], "twin_agreement": row.get("twin_agreement")}


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f}±{statistics.stdev(values):.1f}"


def _best_ptq(result: dict) -> float:
    """The better of the two post-training INT8 files' worst case (the baseline QAT has to beat)."""
    return max(result[k]["worst"] for k in ("ptq_int8", "pt2e_ptq_int8") if k in result)


def recipe_tag(qat: TrainConfig) -> str:
    """The QAT recipe in a folder name, so the variants of one comparison share the float runs and PTQ files."""
    q = qat.qat
    tag = f"e{qat.epochs}_lr{qat.optim.lr:g}_{qat.optim.schedule}"
    if q.freeze_epochs:
        tag += f"_freeze{q.freeze_epochs}"
    if q.carry_method_state:
        tag += "_carry"
    if q.float_teacher:
        tag += f"_ft{q.float_teacher:g}"
    if q.disagreement:
        tag += f"_diva{q.disagreement:g}"
    return tag


def qat_config(base: TrainConfig, checkpoint: Path, out: Path, args: argparse.Namespace, trained_here: bool) -> TrainConfig:
    """``base``'s fine-tune under the QAT recipe (robustedge/qat_recipe.py: what `distill --qat-from` runs),
    with the fields the flags set instead; the run goes to ``<out>/<name>_qat_<recipe tag>``."""
    qat = fine_tune_config(base, checkpoint, epochs=args.qat_epochs, state_beside=True if trained_here else None)
    for value, owner, key in ((args.qat_lr, qat.optim, "lr"), (args.qat_schedule, qat.optim, "schedule"),
                              (args.freeze_epochs, qat.qat, "freeze_epochs"),
                              (args.carry_method_state, qat.qat, "carry_method_state"),
                              (args.float_teacher, qat.qat, "float_teacher"),
                              (args.disagreement, qat.qat, "disagreement")):
        if value is not None:
            setattr(owner, key, value)
    qat.name, qat.out_dir = f"{base.name}_qat_{recipe_tag(qat)}", str(out)
    return qat


def table(results: list[dict]) -> str:
    lines = ["| model | clean (%) | white-box AA (%) | worst case (%) | size (MB) | latency b1 / b64 (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("float", "float (torch)"), ("ptq_int8", "PTQ INT8, onnxruntime quantizer"),
                       ("pt2e_ptq_int8", "PTQ INT8, PT2E quantizer (QAT of 0 epochs)"),
                       ("qat_int8", "QAT INT8 (ONNX Runtime)"),
                       ("control_float", "control: the same fine-tune in float (torch)"),
                       ("control_ptq_int8", "control: its PTQ INT8, onnxruntime quantizer")):
        rows = [r[key] for r in results if key in r]  # results of an older version have no PT2E row
        if not rows:
            continue
        attacked = [r["autoattack"] for r in rows if r["autoattack"] is not None]
        lines.append(f"| {label} | {_mean_std([r['clean'] for r in rows])} | "
                     f"{_mean_std(attacked) if len(attacked) == len(rows) else 'twin refused'} | {_mean_std([r['worst'] for r in rows])} | "
                     f"{statistics.median(r['size_mb'] for r in rows):.3f} | "
                     f"{statistics.median(r['latency_b1_ms'] for r in rows):.2f} / "
                     f"{statistics.median(r['latency_b64_ms'] for r in rows):.2f} |")
    lines += ["", "Paired per-seed differences of the worst case (points, mean±std over seeds; the goal: QAT - float "
              "within 1 point, QAT - best PTQ above the seed noise):", ""]
    for label, pick in (("QAT - float", lambda r: r["qat_int8"]["worst"] - r["float"]["worst"]),
                        ("best PTQ - float", lambda r: _best_ptq(r) - r["float"]["worst"]),
                        ("QAT - best PTQ", lambda r: r["qat_int8"]["worst"] - _best_ptq(r)),
                        ("control float - float", lambda r: r["control_float"]["worst"] - r["float"]["worst"]),
                        ("QAT - control PTQ", lambda r: r["qat_int8"]["worst"] - r["control_ptq_int8"]["worst"])):
        if "control" in label and not all("control_float" in r for r in results):
            continue
        diffs = [pick(r) for r in results]
        lines.append(f"- {label}: {_mean_std(diffs)} (per seed: {' / '.join(f'{100 * d:+.1f}' for d in diffs)})")
    speed = [r["train"]["qat_img_per_s"] / r["train"]["float_img_per_s"] for r in results]
    lines.append("")
    lines.append(f"QAT training speed relative to float training of the same method (median over runs, "
                 f"{results[0]['threads']} thread(s) per run): {statistics.median(speed):.2f}x "
                 f"({statistics.median(r['train']['qat_img_per_s'] for r in results):.0f} vs "
                 f"{statistics.median(r['train']['float_img_per_s'] for r in results):.0f} img/s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    digits = sub.add_parser("digits", help="the quickstart's B-MTARD student, several seeds")
    digits.add_argument("--teachers", default="runs/quickstart", help="a quickstart folder with both teachers")
    digits.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    recipe = sub.add_parser("config", help="a training config (YAML file or shipped recipe), several seeds")
    recipe.add_argument("config", help="e.g. bench/configs/mnv2_32.yaml")
    recipe.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run = sub.add_parser("run", help="existing training run folders (e.g. one per seed)")
    run.add_argument("folders", nargs="+", help="run folders (each with config.yaml and best.safetensors)")
    for p in (digits, recipe, run):
        p.add_argument("--out", required=True)
        p.add_argument("--n", type=int, default=200, help="test images attacked")
        p.add_argument("--square-n", type=int, default=100)
        # the QAT recipe's fields (robustedge/qat_recipe.py); unset: the recipe's own, as `distill --qat-from` runs
        p.add_argument("--qat-epochs", type=int,
                       help="epochs of the fine-tune (recipe: 30%% of the float run's, at least 2)")
        p.add_argument("--qat-lr", type=float, help="its peak learning rate (recipe: a tenth of the float run's)")
        p.add_argument("--qat-schedule", choices=("piecewise", "cosine", "constant"),
                       help="its schedule (recipe: cosine; piecewise: one decay by 10 before the last epoch)")
        p.add_argument("--freeze-epochs", type=int,
                       help="last QAT epochs with observers and BN statistics frozen (qat.freeze_epochs; recipe: 2)")
        p.add_argument("--carry-method-state", action=argparse.BooleanOptionalAction,
                       help="start the QAT method from the float run's state (qat.carry_method_state; recipe: on)")
        p.add_argument("--float-teacher", type=float,
                       help="weight of the float student as an extra teacher on x and x' (qat.float_teacher; recipe: 1)")
        p.add_argument("--disagreement", type=float,
                       help="weight of the DIVA training term: KL(F(x_d) || Q(x_d)) on float-vs-INT8 disagreement "
                            "examples crafted each step (qat.disagreement; recipe: 0)")
        p.add_argument("--control", action="store_true",
                       help="also run the QAT fine-tune's float control (the same start, schedule, method state and "
                            "float teacher, no fake quantisers nor --disagreement; qat.float_control) and its "
                            "onnxruntime PTQ file: tells what QAT buys from what the extra training buys")
        p.add_argument("--float-only", action="store_true",
                       help="stop after the float students and their onnxruntime PTQ files (which no QAT setting "
                            "changes: a later run reuses them)")
        p.add_argument("--whitebox", default="pgd20,cw,autoattack,diva", help="attacks on each INT8 file's twin")
        p.add_argument("--device", default="auto",
                       help="where training and the attacks run (auto: CUDA when present; the seeds then run one "
                            "after another, on a CPU two side by side with one thread each)")
        p.add_argument("--qat-transfer", default="pgd20,autoattack",
                       help="transfer attacks crafted on the fake-quantised model (AutoAttack on its eager graph "
                            "is slow; without it the QAT bundle's reference row, and its gate, are weaker)")
    args = parser.parse_args(argv)
    if args.control and args.float_only:
        parser.error("--control fine-tunes the float students; --float-only stops before any fine-tune")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    if args.mode != "run":
        if len(set(args.seeds)) < len(args.seeds):
            parser.error("a seed is given twice; each seed's runs and bundles have one folder in --out")
        try:
            for seed in args.seeds:
                parse_seed(seed, "--seeds")
        except RobustEdgeError as error:
            parser.error(str(error))
    if args.mode in ("digits", "config"):
        if args.mode == "digits":
            base, stem = quickstart_configs(QuickstartSettings(out=Path(args.teachers), progress=False))["student_bmtard"], "bmtard"
        else:
            try:
                base, stem = load_config(args.config), Path(args.config).name.removesuffix(".yaml")
            except RobustEdgeError as error:
                parser.error(str(error))
            base.progress = False
        configs = []
        for seed in args.seeds:
            cfg = copy.deepcopy(base)
            cfg.name, cfg.seed, cfg.out_dir = f"{stem}_s{seed}", seed, str(out)
            configs.append(cfg)
    else:
        configs = []
        for folder in map(Path, args.folders):
            if not (folder / "config.yaml").is_file() or not (folder / "best.safetensors").is_file():
                parser.error(f"{folder} is not a finished training run (no config.yaml or best.safetensors)")
            cfg = load_config(folder / "config.yaml")
            cfg.name, cfg.out_dir, cfg.progress = folder.name, str(folder.parent), False
            configs.append(cfg)
        if len({c.name for c in configs}) < len(configs):
            parser.error("two run folders share a name; their bundles would share a folder in --out")
    try:
        device = resolve_device(args.device)
    except RobustEdgeError as error:
        parser.error(str(error))
    for cfg in configs:  # the QAT fine-tunes inherit it
        cfg.device = args.device
    out.mkdir(parents=True, exist_ok=True)  # after every check above
    qat_configs = [qat_config(c, Path(c.out_dir) / c.name / "best.safetensors", out, args, args.mode != "run")
                   for c in configs]
    tag = recipe_tag(qat_configs[0])
    jobs = [{"config": c, "qat_config": q, "tag": tag, "out": str(out), "n": args.n, "square_n": args.square_n,
             "whitebox": tuple(args.whitebox.split(",")), "qat_transfer": tuple(args.qat_transfer.split(",")),
             "float_only": args.float_only, "control": args.control, "device": str(device)}
            for c, q in zip(configs, qat_configs)]
    workers, threads = parallel_plan(device, len(jobs))
    results = run_jobs(compare, jobs, workers, threads)
    if args.float_only:
        print(f"float students and their PTQ files are in {out}")
        return 0
    for r in results:
        r["threads"] = threads
    atomic_write_json(out / f"qat_compare_{tag}.json", results)
    text = f"QAT recipe {tag}\n\n" + table(results)
    atomic_write_text(out / f"qat_compare_{tag}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
