"""``robustedge quickstart``: the whole pipeline on the embedded digits data (robustedge/quickstart.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustedge.cli.common import SEED, Defaults, count


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded digits data (offline, CPU)",
                       description="Train a clean teacher (natural) and a robust teacher (TRADES) on the embedded "
                                   "digits data, distil a MobileNetV2 student with B-MTARD, train the same student "
                                   "with PGD-AT as the baseline, evaluate both with the full suite and print a table. "
                                   "Re-running replaces the previous quickstart folder (and nothing else). Exits 1 when an "
                                   "export gate fails (every output is still written).",
                       formatter_class=Defaults)
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--epochs", type=count(1, "--epochs"), default=20, help="epochs of each student")
    p.add_argument("--teacher-epochs", type=count(1, "--teacher-epochs"), default=10, help="epochs of each teacher")
    p.add_argument("--n", type=count(1, "--n"), default=200, help="test examples in the final evaluation")
    p.add_argument("--attacks", default="all", help="attacks of the final evaluation (comma-separated or "
                   "'all'); the export attacks each INT8 file white-box with those of them that have a white-box "
                   "form (pgd20, cw, autoattack), and DIVA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=SEED, default=0, help="seed of every run")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export + verification step")
    p.add_argument("--qat", action="store_true",
                   help="also fine-tune the B-MTARD student with quantization-aware training, export it to INT8 "
                        "and show float / PTQ INT8 / QAT INT8 side by side, each INT8 file attacked white-box "
                        "(off by default: the fine-tune and the white-box attacks on its INT8 file double the "
                        "quickstart, to about 20 minutes on two CPU cores; docs/design/qat.md, section 10)")
    p.add_argument("--qat-epochs", type=count(1, "--qat-epochs"), default=None,
                   help="epochs of the QAT fine-tune (default: the QAT recipe's, 30%% of --epochs, at least 2; "
                        "robustedge/qat_recipe.py)")
    p.add_argument("--train-n", type=count(1, "--train-n"), default=None,
                   help="train every run on a seeded random N of the training digits (default: all 1,294): a "
                        "quicker check of an install or a change, not a result (docs/design/data.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from robustedge.eval_report import parse_attacks
    from robustedge.quickstart import QuickstartSettings, run_quickstart

    summary = run_quickstart(QuickstartSettings(out=Path(args.out), epochs=args.epochs,
                                                teacher_epochs=args.teacher_epochs, eval_n=args.n, device=args.device,
                                                seed=args.seed, attacks=tuple(parse_attacks(args.attacks)),
                                                progress=not args.no_progress, export=not args.no_export, qat=args.qat,
                                                qat_epochs=args.qat_epochs, train_n=args.train_n))
    # like `robustedge export`: a failed gate is a finished run whose artifact must not ship, so a script sees it
    return 1 if summary.get("export_gate_failures") or summary.get("qat_gate_failures") else 0
