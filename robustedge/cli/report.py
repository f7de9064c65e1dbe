"""``robustedge report``: one HTML + Markdown page comparing runs (robustedge/report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustedge.cli.common import count


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one HTML + Markdown page comparing runs: curves, robustness, export, latency",
                       description="For every training run in the folders (a run folder, or a folder of runs such as "
                                   "a quickstart): training curves (loss, clean/PGD-20 validation, and the method's "
                                   "own values such as B-MTARD's temperatures and loss weights), the robustness table "
                                   "(eval.json), accuracy against eps (PGD-20, computed once and cached as "
                                   "eps_curve.json), the export verification table of a bundle beside the run, and an "
                                   "accuracy-robustness-latency scatter. A malformed file is skipped with a warning.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders or folders of runs")
    p.add_argument("--out", help="output folder (default: <first run folder>/report); new, empty or a previous report")
    p.add_argument("--curve-n", type=count(0, "--curve-n"), default=100,
                   help="test examples for the eps curves (default 100; 0: no curves)")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
    p.add_argument("--device", default="auto", help="where eps curves are computed: auto (CUDA when present), cpu, "
                                                    "cuda or cuda:N (torch latency is always measured on the CPU)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from robustedge.report import build_report
    from robustedge.runtime import resolve_device

    folders = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else folders[0] / "report"
    page = build_report(folders, out, args.curve_n, args.data_root, progress=lambda m: print(m, file=sys.stderr),
                        device=resolve_device(args.device))
    print(f"wrote {page} and {page.with_suffix('.md')}")
    return 0
