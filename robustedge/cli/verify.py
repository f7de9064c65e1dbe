"""``robustedge verify``: re-check an export bundle and apply its gate (or the flags' one)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustedge.cli.common import count
from robustedge.cli.export import add_gate, gate, print_platforms, report_gate


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-verify an export bundle (hashes, accuracy, robustness, latency)",
                       description="Check the manifest and every file against its sha256, then re-run the "
                                   "verification table through each runtime and apply the gate (exit 1 when it "
                                   "fails). `python BUNDLE/verify.py` runs the same checks without torch.")
    p.add_argument("bundle", help="a folder written by `robustedge export`")
    p.add_argument("--square-n", type=count(0, "--square-n"), default=None,
                   help="run a fresh Square attack on N examples of each runtime (default: replay the stored "
                        "Square examples; 0: leave Square out)")
    p.add_argument("--out", default=None,
                   help="folder for verify.json and verify.md (default: BUNDLE-verify beside the bundle; never "
                        "inside it: the bundle stays as exported)")
    p.add_argument("--emulate", default=None, metavar="ISA",
                   help="also replay every file on this processor family's builds of its runtimes, under emulation "
                        "(arm64: qemu; prepared once, cached in $ROBUSTEDGE_CACHE or ~/.cache/robustedge), with "
                        "agreement against this machine (default: the ones the export replayed on; none: no "
                        "emulation)")
    add_gate(p)
    p.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from robustedge.edge.reverify import verify_bundle, verify_out
    from robustedge.edge.emulated_env import parse_isas
    from robustedge.verifier import Gate, format_flags, format_table, load_manifest

    manifest = load_manifest(Path(args.bundle))
    verify_out(args.bundle, args.out)  # refused before anything runs
    emulate = None if args.emulate is None else parse_isas(args.emulate)
    report, failures = verify_bundle(args.bundle, gate(args, Gate.from_dict(manifest["gate"])), args.square_n,
                                     progress=lambda m: print(m, file=sys.stderr), out=args.out, emulate=emulate)
    print(format_table(report["table"]))
    print(format_flags(report["flags"]), end="")
    print_platforms(report)
    print(f"wrote {Path(report['out']) / 'verify.json'} and verify.md")
    return report_gate(failures, Path(args.bundle))
