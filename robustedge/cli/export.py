"""``robustedge export``: a checkpoint to a verified bundle; and the gate flags that ``verify`` shares."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustedge import options
from robustedge.cli.common import SEED, SOURCE_HELP, Defaults, add_model_facts, count, facts, typed


def add_gate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-drop", type=typed(options.parse_fraction, "--max-drop"), default=None,
                   help="gate: largest drop (fraction, e.g. 0.05) of an artifact's clean, transfer or worst-case "
                        "accuracy below torch's")
    p.add_argument("--min-agreement", type=typed(options.parse_fraction, "--min-agreement"), default=None,
                   help="gate: smallest top-1 agreement with torch (fraction, e.g. 0.95)")
    p.add_argument("--allow-flags", action="store_true", default=None,
                   help="report attack-failure flags without failing the gate")


def gate(args: argparse.Namespace, base=None):
    from robustedge.verifier import Gate

    return (base or Gate()).override(args.max_drop, args.min_agreement, args.allow_flags)


def report_gate(failures: list[str], where: Path) -> int:
    if failures:
        print("GATE FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"gate passed; bundle: {where}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    from robustedge.edge.bundle import INT8_QUANTIZERS
    from robustedge.edge.convert import CALIBRATION_METHODS, FLOAT_LAYERS, INT8_ACTIVATIONS
    from robustedge.edge.formats import formats_help

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX / fp16 / INT8 / TensorRT and re-verify robustness",
        description="Export to a bundle (model files, manifest.json with sha256 hashes, verify.npz, and verify.py: "
                    "the bundle's own torch-free verifier) and verify every artifact through its own runtime: clean "
                    "accuracy, agreement with torch, transfer robustness (PGD-20, AutoAttack crafted on torch), "
                    "black-box Square on the runtime, size, latency. Exits 1 when the gate fails.",
        formatter_class=Defaults)
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument("--formats", default="onnx,onnx-fp16,onnx-int8", help=formats_help())
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is a RobustEdge bundle (never any other folder)")
    p.add_argument("--n", type=count(1, "--n"), default=500, help="test examples used for verification")
    p.add_argument("--calibration-n", type=count(1, "--calibration-n"), default=512,
                   help="training images for INT8 calibration")
    p.add_argument("--calibration-method", default="minmax", choices=CALIBRATION_METHODS, help="INT8 calibration")
    p.add_argument("--calibrate-adversarial", action="store_true",
                   help="calibrate INT8 on half clean, half PGD-20 examples of the float model")
    p.add_argument("--int8-activations", default="uint8", choices=INT8_ACTIVATIONS,
                   help="activation type of the ONNX INT8 file: uint8 is ONNX Runtime's fast x86 path; int8 for "
                        "runtimes that want signed; TensorRT INT8 engines always use int8-symmetric")
    p.add_argument("--int8-quantizer", default="onnxruntime", choices=INT8_QUANTIZERS,
                   help="who quantises a float student's onnx-int8 file: onnxruntime's static quantizer, or pt2e: "
                        "torchao's PT2E quantizer that QAT trains under, calibrated, no training (the QAT file of "
                        "zero epochs; min-max calibration)")
    p.add_argument("--int8-float-layers", default="none", choices=FLOAT_LAYERS,
                   help="keep the first and/or last weighted layer of onnxruntime's INT8 files in float (mixed "
                        "precision every ONNX Runtime build runs; measured in docs/results/qat.md)")
    p.add_argument("--transfer-attacks", default="pgd20,autoattack", help="attacks crafted on torch and replayed")
    p.add_argument("--whitebox-attacks", default="pgd20,cw,autoattack,diva",
                   help="attacks run on the exact differentiable twin of each INT8 artifact and replayed on its "
                        "runtime ('none' to skip); diva maximises float-vs-INT8 disagreement")
    p.add_argument("--flags-n", type=count(1, "--flags-n"), default=100,
                   help="examples the gradient-based attack-failure checks run on")
    p.add_argument("--square-n", type=count(0, "--square-n"), default=100,
                   help="examples for the black-box Square attack (0: off)")
    p.add_argument("--square-queries", type=count(1, "--square-queries"), default=5000,
                   help="Square's query budget (AutoAttack's 5000)")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of calibration sampling and the attacks")
    p.add_argument("--device", default="auto", help="where the torch side runs (transfer and white-box attacks, "
                                                    "gradient checks): auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--emulate", default="none", metavar="ISA",
                   help="also replay the finished bundle on this processor family's builds of its runtimes, under "
                        "emulation (arm64: qemu; prepared once, cached in $ROBUSTEDGE_CACHE or ~/.cache/robustedge); "
                        "its rows join the gated table and `robustedge verify` replays them again (default: none)")
    add_gate(p)
    add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_export)


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(a.strip() for a in text.split(",") if a.strip())


def cmd_export(args: argparse.Namespace) -> int:
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.runtime import resolve_device
    from robustedge.flags import FlagSettings
    from robustedge.verifier import format_flags, format_table

    opts = ExportOptions(formats=args.formats, n=args.n, calibration_n=args.calibration_n,
                         calibration_method=args.calibration_method, calibrate_adversarial=args.calibrate_adversarial,
                         int8_activations=args.int8_activations, int8_quantizer=args.int8_quantizer,
                         int8_float_layers=args.int8_float_layers,
                         transfer_attacks=_names(args.transfer_attacks), whitebox_attacks=_names(args.whitebox_attacks),
                         square_n=args.square_n, square_queries=args.square_queries, data_root=args.data_root,
                         seed=args.seed, gate=gate(args), flags=FlagSettings(n=args.flags_n), emulate=args.emulate)
    opts.validate()  # before anything is read or written
    out = Path(args.out)
    manifest, failures = export_bundle(args.checkpoint, out, opts, progress=lambda m: print(m, file=sys.stderr),
                                       force=args.force, facts=facts(args), device=resolve_device(args.device))
    print(format_table(manifest["table"]))
    print(format_flags(manifest["flags"]), end="")
    parity = manifest["parity"]
    print(f"{parity['format']} vs {parity['reference']}: max |logit difference| {parity['max_abs_logit_diff']:.2e} "
          f"on {parity['n']} test and random inputs, top-1 agreement {100 * parity['agreement']:.1f}% on the "
          f"{parity['n_agreement']} test inputs")
    for fmt, row in manifest["table"].items():
        if "twin_agreement" in row and "@" not in fmt:  # an emulated row carries its format's twin figures
            print(f"{fmt}: its twin agrees with the runtime on {100 * row['twin_agreement']:.1f}% of the clean and "
                  f"adversarial inputs (max |logit difference| {row['twin_max_logit_diff']:.3g})")
    for fmt, why in manifest["skipped"].items():
        print(f"{fmt} not built: {why}")
    print_platforms(manifest)
    return report_gate(failures, out)


def print_platforms(report: dict) -> None:
    """Where the rows were measured: this machine, and each emulated processor with its runtime builds."""
    def builds(facts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in facts.get("runtimes", {}).items()) or "no runtime"

    if report.get("platform"):
        print(f"measured on {report['platform']['isa']} ({builds(report['platform'])})"
              + (", emulated rows as below" if report.get("emulated") else ""))
    emulated = report.get("emulated") or {}
    for isa, where in emulated.get("platforms", {}).items():
        if "emulator" in where:  # not the x86 reference of the comparison (<isa>_reference)
            print(f"<format>@{isa}: {where['isa']} under {where['emulator']} (cpu {where['cpu']}), Python "
                  f"{where['python']}, {builds(where)}; no latency under emulation")
    for row, why in emulated.get("skipped", {}).items():
        print(f"{row} not replayed: {why}")
