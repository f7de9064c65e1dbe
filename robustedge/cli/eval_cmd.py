"""``robustedge eval``: the robustness suite on one model, over one process or many (torchrun)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustedge import options
from robustedge.cli.common import EPS, SEED, SOURCE_HELP, Defaults, add_model_facts, count, facts, typed
from robustedge.errors import RobustEdgeError


def add(sub: argparse._SubParsersAction) -> None:
    from robustedge.eval_report import DEFAULT_ATTACKS, SUITE
    from robustedge.options import AUTOATTACK_BLOCK

    p = sub.add_parser(
        "eval", help="robustness suite (clean, FGSM, PGD-20, CW-inf, AutoAttack) on a checkpoint",
        description="Evaluate a RobustEdge checkpoint with the suite of docs/design/evaluation.md (\"Evaluation protocol\") "
                    "and write JSON + Markdown. Attacks: " + "; ".join(f"{a.name}: {a.description}"
                                                                     for a in SUITE.values()),
        formatter_class=Defaults)
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help="comma-separated attack names, or 'all' (clean is always included)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (not needed for digits)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to attack")
    p.add_argument("--n", "--num-examples", dest="n", type=count(0, "--n"), default=0,
                   help="evaluate the first N examples of the split (default 0: the whole split, as RobustBench and "
                        "the papers report); under torchrun write --num-examples (torchrun's own parser takes --n "
                        "for a prefix of its options)")
    p.add_argument("--eps", type=EPS, default=None,
                   help="L-inf radius in [0, 1], e.g. 0.031 or 8/255 (default: the checkpoint's eps)")
    p.add_argument("--batch-size", type=typed(options.parse_batch_size, "--batch-size"), default="auto",
                   help="batch size of the attacks, or 'auto': the largest that fits in memory")
    p.add_argument("--aa-batch-size", type=count(1, "--aa-batch-size"), default=AUTOATTACK_BLOCK,
                   help="AutoAttack's block of examples, fixed whatever --batch-size is: pyautoattack's results "
                        "depend on its blocks, so the same block gives the same numbers on every machine and "
                        "number of processes (the package's own default)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random starts and of AutoAttack")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>-eval/ beside the checkpoint)")
    p.add_argument("--fold-bn", action="store_true",
                   help="attack a conv+BN-folded channels_last copy: the same function to ~1e-6; PGD-20 "
                        "2.6x, AutoAttack 2.6x faster on the quickstart student (CPU, bench/RESULTS.md)")
    p.add_argument("--flags-n", type=count(1, "--flags-n"), default=100,
                   help="examples the attack-failure checks run on (Square 1000 queries, zero gradients, flat loss, "
                        "4 x eps, PGD-100 x 2 restarts)")
    p.add_argument("--flags-budget", type=typed(options.parse_positive, "--flags-budget"), default=0.5,
                   help="the checks may cost at most this multiple of the suite's model passes (fewer examples "
                        "when it is cheap; none for clean accuracy alone or on fewer than 10 examples)")
    p.add_argument("--no-flags", action="store_true", help="skip the attack-failure checks")
    p.add_argument("--allow-flags", action="store_true",
                   help="exit 0 even when an attack-failure flag fires (default: exit 1; a weak attack choice "
                        "such as FGSM alone is a note, never a failure)")
    p.add_argument("--resume", action="store_true",
                   help="continue the evaluation saved in --out's eval.json (written after every attack and "
                        "block) from its last finished attack and block; refused if the model, examples, attacks, "
                        "eps, seed or AutoAttack block differ")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_facts(p)
    p.epilog = ("many processes: torchrun --standalone --nproc_per_node N -m robustedge.cli eval CKPT "
                "--num-examples 10000 ... shards the examples over "
                "the ranks (gloo on CPUs, NCCL on GPUs) with per-example seeds: the same numbers as one process "
                "(docs/design/any-model.md, \"Evaluation over many processes\")")
    p.set_defaults(func=cmd_eval)


def _eval_out(args: argparse.Namespace) -> Path:
    from robustedge.loading import ROBUSTBENCH_PREFIX

    if args.out:
        return Path(args.out)
    if args.checkpoint.startswith(ROBUSTBENCH_PREFIX):
        return Path("runs") / "eval" / args.checkpoint[len(ROBUSTBENCH_PREFIX):]
    ckpt = Path(args.checkpoint)
    return ckpt.with_name(ckpt.stem + "-eval")


def cmd_eval(args: argparse.Namespace) -> int:
    from robustedge.eval_report import EVAL_OUTPUTS, parse_attacks
    from robustedge.files import check_output_files
    from robustedge.runtime import resolve_device
    from robustedge.sharding import init_from_env, leave

    attacks = parse_attacks(args.attacks)
    out = _eval_out(args)
    check_output_files(out, EVAL_OUTPUTS)
    args.saved = _saved_eval(out, args.resume)
    world, device = init_from_env(resolve_device(args.device))
    try:
        status = _eval(args, attacks, out, world, device)
    except BaseException:
        leave(wait=False)
        raise
    leave()
    return status


def _saved_eval(out: Path, resume: bool):
    """The evaluation saved in ``out`` to continue (``--resume``), or None; without ``--resume`` an unfinished
    one there is started over, which is said."""
    from robustedge.eval_report import resumable_report
    from robustedge.files import read_json

    path = out / "eval.json"
    if not resume:
        if path.is_file():
            try:
                if read_json(path).get("complete") is False:
                    print(f"starting over: {path} holds an unfinished evaluation (--resume continues it)")
            except (RobustEdgeError, AttributeError):
                pass
        return None
    if not path.is_file():
        raise RobustEdgeError(f"nothing to resume: {path} does not exist (run without --resume)")
    return resumable_report(read_json(path), str(path))


def _eval(args: argparse.Namespace, attacks: list[str], out: Path, world, device) -> int:
    from robustedge import api
    from robustedge.data import split_for_model
    from robustedge.flags import FlagSettings

    from robustedge.sharding import rank_zero_first

    say = print if world.main else (lambda *a, **k: None)
    with rank_zero_first(world):  # one rank downloads (weights, data) while the others wait for its files
        model, meta = api.load(args.checkpoint, facts=facts(args), device=device)
        eps = args.eps if args.eps is not None else meta.eps
        if eps is None:
            raise RobustEdgeError("the checkpoint records no eps; pass --eps")
        split = split_for_model(meta, args.dataset, args.data_root, args.split, args.n or None,
                                args.download and world.main)
    x, y = split.float_images(device), split.labels.to(device)
    say(f"evaluating {args.checkpoint} ({meta.spec.arch}, {meta.method or 'unknown method'}) on "
        f"{len(y)} {args.dataset or meta.dataset} {args.split} examples"
        + split.shortfall(args.n)
        + f", eps={eps:.4f}, device={device}" + (f", {world.size} processes" if world.size > 1 else ""), flush=True)
    described = {"checkpoint": str(args.checkpoint), "dataset": args.dataset or meta.dataset, "split": args.split,
                 "arch": meta.spec.arch, "method": meta.method, "seed": args.seed}

    def save(partial) -> None:
        partial.info |= described
        partial.save(out / "eval.json", out / "eval.md")

    if args.saved is not None and not args.saved.complete:
        done = ", ".join(args.saved.accuracy) or "nothing"
        say(f"resuming {out / 'eval.json'}: {done} done" + (
            f", {args.saved.partial['attack']} on {len(args.saved.partial['correct'])} examples"
            if args.saved.partial else ""))
    report = api.evaluate(model, x, y, attacks=attacks, eps=eps, batch_size=args.batch_size, seed=args.seed,
                          aa_batch_size=args.aa_batch_size, show_progress=not args.no_progress, fold_bn=args.fold_bn,
                          flags=False if args.no_flags else FlagSettings(n=args.flags_n, budget=args.flags_budget),
                          device=device, distributed=world.size > 1, resume=args.saved, on_update=save)
    say(f"attack batch size: {report.info['batch_size']}" + (" (auto)" if args.batch_size == "auto" else "")
        + (f"; AutoAttack blocks of {args.aa_batch_size}" if "autoattack" in attacks else ""))
    if world.main:
        save(report)
    say(report.to_text())
    say(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    if report.flags and not args.allow_flags:
        say(f"robustedge: {len(report.flags)} attack-failure flag(s) fired: these robustness numbers are not "
            f"trustworthy (docs/design/flags.md, \"Attack-failure flags\"); --allow-flags to exit 0", file=sys.stderr)
        return 1
    return 0
