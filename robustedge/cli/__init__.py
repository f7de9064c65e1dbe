"""``robustedge <command>``: the command-line front end.

Each command is a thin function over the library, in its own module here, which registers its parser with
``add(sub)`` and holds its ``cmd_*`` function; common.py has what their parsers share. Every option is parsed
and range-checked where it is read (:mod:`robustedge.options`); a :class:`RobustEdgeError` or a bad option
becomes one line on stderr and exit status 2, before anything is written; anything else is a bug and keeps
its traceback. docs/design/index.md describes what each command computes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from robustedge._version import __version__
from robustedge.cli import app, eval_cmd, export, import_cmd, listing, quickstart, report, training, verify
from robustedge.cli.common import Parser
from robustedge.errors import RobustEdgeError

EXAMPLES = """examples:
  robustedge quickstart        teachers + B-MTARD student + PGD-AT baseline on digits, evaluated and exported
  robustedge eval runs/quickstart/student_bmtard/best.safetensors --attacks clean,pgd20,autoattack --n 200
  robustedge export runs/quickstart/student_bmtard/best.safetensors --out bundle
  robustedge verify bundle     re-check a bundle (or: python bundle/verify.py, without torch)
  robustedge app               the browser demo on runs/quickstart
docs/design/index.md (in the source tree) describes the algorithms, the evaluation protocol and the bundle format.
"""

COMMANDS = (quickstart, training, eval_cmd, export, verify, import_cmd, report, app, listing)  # --help's order


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="robustedge", description="Robust distillation, robustness evaluation and verified edge export.",
                    epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robustedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (AutoAttack's per-attack log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a bad option (2, its one line already printed)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("robustedge.autoattack").setLevel(logging.WARNING)
    try:
        from robustedge.pt2e_fast import fast_paths_enabled

        fast_paths_enabled()  # the environment's settings are checked before a command touches anything
        return int(args.func(args) or 0)
    except RobustEdgeError as exc:
        print(f"robustedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustedge: interrupted", file=sys.stderr)
        return 130
