"""Verify a RobustEdge export bundle on this device: numpy + the artifact's runtime, nothing else.

    python verify.py [BUNDLE] [--formats onnx,onnx-int8] [--max-drop 0.05] [--min-agreement 0.95]
    python verify.py BUNDLE --no-latency --json report.json --logits logits.npz   # machine-readable

These are the checks of ``robustedge verify``, and their messages, to the letter: RobustEdge keeps them
in the package ``robustedge.verifier`` and assembles its modules into this one file, the ``verify.py``
every bundle carries, so a phone-class CPU or a Jetson (numpy + onnxruntime for ``.onnx``/``.ort``,
+ tensorrt for engines, + executorch for ``.pte``) runs exactly what the library runs. It needs
neither RobustEdge nor torch (ExecuTorch's Python runtime imports torch itself, and only a ``.pte``
loads it).

It refuses (exit 2, one line) a manifest that does not follow the bundle schema, a file entry that
is not a plain name inside the bundle, an unknown format or gate key, a file whose sha256 differs
from the manifest, and a ``verify.npz`` with missing, extra, mistyped or misshapen arrays. It then
replays the clean and adversarial samples through each model on this device, prints clean
accuracy, top-1 agreement with the torch model and transfer robust accuracy next to the numbers
measured at export time, and applies the bundle's gate (exit 1 when it fails). Non-finite logits are
an error, never a result. ``--json`` writes the table, the flags, the gate's verdict and where they
were measured (ISA, Python, runtime builds); ``--logits`` every replayed logit (``<format>/<column>``),
so two processors running the same file can be compared (``robustedge verify --emulate arm64``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from robustedge.verifier.base import RobustEdgeError, is_fraction, write_atomically
from robustedge.verifier.flags import bundle_flags
from robustedge.verifier.gate import Gate
from robustedge.verifier.replays import artifact_row
from robustedge.verifier.runners import platform_facts
from robustedge.verifier.schema import read_bundle
from robustedge.verifier.tables import format_flags, format_table


def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not is_fraction(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every RobustEdge command
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="the bundle folder (default: the folder this file is in)")
    parser.add_argument("--formats", default=None, help="comma-separated formats to check (default: all runnable)")
    parser.add_argument("--max-drop", type=_fraction_arg, default=None, help="gate override (fraction)")
    parser.add_argument("--min-agreement", type=_fraction_arg, default=None, help="gate override (fraction)")
    parser.add_argument("--allow-flags", action="store_true", help="report attack-failure flags without failing")
    parser.add_argument("--no-latency", action="store_true",
                        help="leave latency out (under an emulator it times the emulator, not the processor)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the table, flags, gate verdict and platform (ISA, runtime builds) as JSON")
    parser.add_argument("--logits", type=Path, default=None, metavar="FILE",
                        help="also write every replayed logit to this .npz (keys <format>/<column>)")
    args = parser.parse_args(argv)
    outputs = [path for path in (args.json, args.logits) if path is not None]
    for path in outputs:
        folder = path.absolute().parent
        if path.is_dir() or not folder.is_dir():
            print(f"error: {path} must be a file in an existing folder", file=sys.stderr)
            return 2
        if folder.resolve() == args.bundle.resolve() or args.bundle.resolve() in folder.resolve().parents:
            print(f"error: {path} is inside the bundle; the verifier never writes into a bundle", file=sys.stderr)
            return 2
    if len(outputs) == 2 and outputs[0].absolute() == outputs[1].absolute():
        print("error: --json and --logits name the same file", file=sys.stderr)
        return 2
    logits: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    try:
        manifest, samples = read_bundle(args.bundle)
        gate = Gate.from_dict(manifest["gate"]).override(args.max_drop, args.min_agreement, args.allow_flags or None)
        wanted = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else list(manifest["files"])
        for fmt in wanted:
            if fmt not in manifest["files"]:
                raise RobustEdgeError(f"the bundle has no format '{fmt}'; it has {', '.join(manifest['files'])}")
        table = {"torch": {k: v for k, v in manifest["table"]["torch"].items() if not k.startswith("latency")}}
        flags = {"torch": manifest.get("flags", {}).get("torch", [])}
        for fmt in wanted:
            outputs: dict[str, np.ndarray] = {}
            try:
                table[fmt], results, _ = artifact_row(args.bundle / manifest["files"][fmt]["file"], fmt, samples,
                                                      latency=not args.no_latency, logits=outputs)
            except ImportError as exc:  # this device lacks that runtime
                print(f"skipping {fmt}: {exc}", file=sys.stderr)
                skipped[fmt] = str(exc)
                continue
            logits.update({f"{fmt}/{column}": out for column, out in outputs.items()})
            for key in ("twin_agreement", "twin_max_logit_diff"):
                if key in manifest["table"].get(fmt, {}):
                    table[fmt][key] = manifest["table"][fmt][key]
            flags[fmt] = bundle_flags(manifest, fmt, results, gate.flag_tolerance)
    except RobustEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("torch = the numbers measured at export time; the others were measured now, on this device")
    print(format_table(table), end="")
    print(format_flags(flags), end="")
    failures = gate.check(table, flags)
    try:
        if args.json is not None:
            report = {"table": table, "flags": flags, "gate": gate.to_dict(), "gate_failures": failures,
                      "skipped": skipped, "platform": platform_facts()}
            write_atomically(args.json, lambda fh: fh.write(json.dumps(report, indent=1).encode("utf-8")))
        if args.logits is not None:
            write_atomically(args.logits, lambda fh: np.savez(fh, **logits))
    except OSError as exc:
        print(f"error: cannot write {exc.filename or 'the report'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if failures:
        print("GATE FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("gate passed")
    return 0
