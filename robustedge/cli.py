"""``robustedge <command>``: the command-line front end.

Each command is a thin function over the library. A :class:`RobustEdgeError` becomes one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from robustedge import __version__
from robustedge.errors import RobustEdgeError

EXAMPLES = """examples:
  robustedge quickstart                      train teachers, distil a student with B-MTARD, evaluate
  robustedge eval runs/quickstart/student_bmtard.safetensors --attacks clean,pgd20,autoattack --n 500
  robustedge models                          list the architectures in the registry
"""


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from robustedge.evaluate import DEFAULT_ATTACKS, SUITE

    p = sub.add_parser(
        "eval", help="robustness suite (clean, FGSM, PGD-20, CW-inf, AutoAttack) on a checkpoint",
        description="Evaluate a RobustEdge checkpoint with the suite of DESIGN.md section 4 and write "
                    "JSON + Markdown. Attacks: " + "; ".join(f"{a.name}: {a.description}" for a in SUITE.values()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors model written by RobustEdge")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help="comma-separated attack names, or 'all' (clean is always included)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (not needed for digits)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to attack")
    p.add_argument("--n", type=int, default=1000, help="evaluate the first N examples of the split (0: all)")
    p.add_argument("--eps", type=float, default=None, help="L-inf radius in [0, 1] (default: the checkpoint's eps)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the white-box attacks")
    p.add_argument("--aa-batch-size", type=int, default=None, help="batch size of AutoAttack (default: --batch-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random starts and of AutoAttack")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>-eval/ beside the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from robustedge.attacks import check_eps
    from robustedge.checkpoint import load_model
    from robustedge.evaluate import evaluate, parse_attacks
    from robustedge.runtime import resolve_device

    attacks = parse_attacks(args.attacks)
    if args.n < 0:
        raise RobustEdgeError(f"--n must be >= 0, got {args.n}")
    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    eps = args.eps if args.eps is not None else meta.eps
    if eps is None:
        raise RobustEdgeError("the checkpoint records no eps; pass --eps")
    eps = check_eps(eps)
    split = load_eval_split(meta, args.dataset, args.data_root, args.split, args.n or None, args.download)
    x, y = split.float_images(device), split.labels.to(device)
    print(f"evaluating {args.checkpoint} ({meta.spec.arch}, {meta.method or 'unknown method'}) on "
          f"{len(y)} {args.dataset or meta.dataset} {args.split} examples, eps={eps:.4f}, device={device}",
          file=sys.stderr)
    report = evaluate(model, x, y, attacks=attacks, eps=eps, batch_size=args.batch_size, seed=args.seed,
                      aa_batch_size=args.aa_batch_size, show_progress=not args.no_progress)
    report.info = {"checkpoint": str(args.checkpoint), "dataset": args.dataset or meta.dataset, "split": args.split,
                   "arch": meta.spec.arch, "method": meta.method, "seed": args.seed}
    ckpt = Path(args.checkpoint)
    out = Path(args.out) if args.out else ckpt.with_name(ckpt.stem + "-eval")
    report.save(out / "eval.json", out / "eval.md")
    print(report.to_text())
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def load_eval_split(meta, dataset: str | None, data_root: str | None, split: str, n: int | None,
                    download: bool = False):
    """The split a checkpoint should be judged on, shaped and split exactly as in its training run."""
    from robustedge.data import load_dataset

    data = meta.extra.get("data", {})
    name = dataset or meta.dataset
    ds = load_dataset(name, data_root or data.get("root"), image_size=meta.spec.image_size,
                      channels=meta.spec.in_channels, val_fraction=data.get("val_fraction", 0.1),
                      seed=data.get("seed", 0), download=download)
    if ds.num_classes != meta.spec.num_classes:
        raise RobustEdgeError(f"dataset '{name}' has {ds.num_classes} classes but the checkpoint's "
                              f"{meta.spec.arch} has {meta.spec.num_classes} outputs")
    return ds.split(split).take(n)


def _add_listing(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=lambda a: _print_lines(__import__("robustedge.models", fromlist=["x"]).model_names()))
    p = sub.add_parser("datasets", help="list the dataset registry")
    p.set_defaults(func=lambda a: _print_lines(list(__import__("robustedge.data", fromlist=["x"]).DATASETS)))


def _print_lines(lines: list[str]) -> int:
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robustedge", description="Robust distillation, robustness evaluation and verified edge export.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robustedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (AutoAttack's per-attack log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    _add_listing(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("robustedge.autoattack").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except RobustEdgeError as exc:
        print(f"robustedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("robustedge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
