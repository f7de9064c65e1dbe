"""``robustedge <command>``: the command-line front end.

Each command is a thin function over the library. Every option is parsed and range-checked where
it is read (:mod:`robustedge.options`); a :class:`RobustEdgeError` or a bad option becomes one line on
stderr and exit status 2, before anything is written; anything else is a bug and keeps its
traceback. docs/design.md describes what each command computes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable

from robustedge import options
from robustedge._version import __version__
from robustedge.errors import RobustEdgeError

EXAMPLES = """examples:
  robustedge quickstart        teachers + B-MTARD student + PGD-AT baseline on digits, evaluated and exported
  robustedge eval runs/quickstart/student_bmtard/best.safetensors --attacks clean,pgd20,autoattack --n 200
  robustedge export runs/quickstart/student_bmtard/best.safetensors --out bundle
  robustedge verify bundle     re-check a bundle (or: python bundle/verify.py, without torch)
  robustedge app               the browser demo on runs/quickstart
docs/design.md (in the source tree) describes the algorithms, the evaluation protocol and the bundle format.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (and exit 2) like every other error."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)  # "argument --n: --n must..." -> "--n must..."
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, but not "(default: None)" after a help text that already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def _typed(parse: Callable, *args) -> Callable[[str], object]:
    """An argparse ``type`` from one of :mod:`robustedge.options`' parsers (their message, one line)."""
    def convert(text: str):
        try:
            return parse(text, *args)
        except RobustEdgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _count(minimum: int, name: str) -> Callable[[str], object]:
    return _typed(options.parse_int, name, minimum)


SEED = _typed(options.parse_seed, "--seed")
EPS = _typed(options.parse_eps, "--eps")
SOURCE_HELP = ("a RobustEdge checkpoint, a .pt/.pth/.safetensors state dict (with --arch) or robustbench:<name> "
               "(the zoo extra)")


def _floats(name: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            return [options.parse_number(v, name) for v in text.split(",")]
        except RobustEdgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _fact(field: str) -> Callable[[str], object]:
    """The argparse type of a model fact: the rule the API applies to the same keyword (loading.FACT_RULES)."""
    from robustedge.loading import check_fact

    return _typed(lambda text: check_fact(field, text, cli=True))


def _add_model_facts(p: argparse.ArgumentParser, dataset_and_eps: bool = False) -> None:
    """What a foreign model file does not say (robustedge/loading.py); RobustEdge checkpoints ignore these."""
    g = p.add_argument_group("foreign models (state dicts, RobustBench): what the file does not say")
    g.add_argument("--arch", help="registry architecture of a state dict file (robustedge models lists them)")
    g.add_argument("--num-classes", type=_fact("num_classes"), help="default: the dataset's")
    g.add_argument("--in-channels", type=_fact("in_channels"), help="default: the dataset's")
    g.add_argument("--image-size", type=_fact("image_size"), help="default: the dataset's")
    g.add_argument("--width", type=_fact("width"), default=1.0, help="width multiplier")
    g.add_argument("--mean", type=_floats("--mean"), help="input normalisation the weights expect, e.g. "
                                                          "0.4914,0.4822,0.4465 (kuangliu's CIFAR-10)")
    g.add_argument("--std", type=_floats("--std"), help="with --mean, e.g. 0.2023,0.1994,0.2010")
    if dataset_and_eps:
        g.add_argument("--dataset", default=None, help="dataset the model is for (default: the checkpoint's; "
                                                       "cifar10 for foreign models)")
        g.add_argument("--eps", type=EPS, default=None,
                       help="L-inf radius in [0, 1], e.g. 8/255 (default: the checkpoint's or the dataset's)")


def _facts(args: argparse.Namespace):
    from robustedge.loading import ModelFacts

    return ModelFacts(args.arch, args.num_classes, args.in_channels, args.image_size, args.width, args.mean,
                      args.std, args.dataset, args.eps).checked(cli=True)


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------

def _add_eval(sub: argparse._SubParsersAction) -> None:
    from robustedge.suite import DEFAULT_ATTACKS, SUITE
    from robustedge.options import AUTOATTACK_BLOCK

    p = sub.add_parser(
        "eval", help="robustness suite (clean, FGSM, PGD-20, CW-inf, AutoAttack) on a checkpoint",
        description="Evaluate a RobustEdge checkpoint with the suite of docs/design.md (\"Evaluation protocol\") "
                    "and write JSON + Markdown. Attacks: " + "; ".join(f"{a.name}: {a.description}"
                                                                     for a in SUITE.values()),
        formatter_class=_Defaults)
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                   help="comma-separated attack names, or 'all' (clean is always included)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, help="folder holding the dataset files (not needed for digits)")
    p.add_argument("--download", action="store_true", help="download the dataset into --data-root if missing")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split to attack")
    p.add_argument("--n", "--num-examples", dest="n", type=_count(0, "--n"), default=0,
                   help="evaluate the first N examples of the split (default 0: the whole split, as RobustBench and "
                        "the papers report); under torchrun write --num-examples (torchrun's own parser takes --n "
                        "for a prefix of its options)")
    p.add_argument("--eps", type=EPS, default=None,
                   help="L-inf radius in [0, 1], e.g. 0.031 or 8/255 (default: the checkpoint's eps)")
    p.add_argument("--batch-size", type=_typed(options.parse_batch_size, "--batch-size"), default="auto",
                   help="batch size of the attacks, or 'auto': the largest that fits in memory")
    p.add_argument("--aa-batch-size", type=_count(1, "--aa-batch-size"), default=AUTOATTACK_BLOCK,
                   help="AutoAttack's block of examples, fixed whatever --batch-size is: pyautoattack's results "
                        "depend on its blocks, so the same block gives the same numbers on every machine and "
                        "number of processes (the package's own default)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random starts and of AutoAttack")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>-eval/ beside the checkpoint)")
    p.add_argument("--fold-bn", action="store_true",
                   help="attack a conv+BN-folded channels_last copy: the same function to ~1e-6; PGD-20 "
                        "2.6x, AutoAttack 2.6x faster on the quickstart student (CPU, bench/RESULTS.md)")
    p.add_argument("--flags-n", type=_count(1, "--flags-n"), default=100,
                   help="examples the attack-failure checks run on (Square 1000 queries, zero gradients, flat loss, "
                        "4 x eps, PGD-100 x 2 restarts)")
    p.add_argument("--flags-budget", type=_typed(options.parse_positive, "--flags-budget"), default=0.5,
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
    _add_model_facts(p)
    p.epilog = ("many processes: torchrun --standalone --nproc_per_node N -m robustedge.cli eval CKPT "
                "--num-examples 10000 ... shards the examples over "
                "the ranks (gloo on CPUs, NCCL on GPUs) with per-example seeds: the same numbers as one process "
                "(docs/design.md, \"Evaluation over many processes\")")
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
    from robustedge.suite import EVAL_OUTPUTS, parse_attacks
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
    from robustedge.suite import resumable_report
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
        model, meta = api.load(args.checkpoint, facts=_facts(args), device=device)
        eps = args.eps if args.eps is not None else meta.eps
        if eps is None:
            raise RobustEdgeError("the checkpoint records no eps; pass --eps")
        split = split_for_model(meta, args.dataset, args.data_root, args.split, args.n or None,
                                args.download and world.main)
    x, y = split.float_images(device), split.labels.to(device)
    say(f"evaluating {args.checkpoint} ({meta.spec.arch}, {meta.method or 'unknown method'}) on "
        f"{len(y)} {args.dataset or meta.dataset} {args.split} examples, eps={eps:.4f}, device={device}"
        + (f", {world.size} processes" if world.size > 1 else ""), flush=True)
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
            f"trustworthy (docs/design.md, \"Attack-failure flags\"); --allow-flags to exit 0", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# train / distill
# --------------------------------------------------------------------------------------------

def _add_training(sub: argparse._SubParsersAction) -> None:
    from robustedge.config import recipe_names
    from robustedge.methods import METHODS, method_names

    names = method_names()
    for command, helptext, kind in (
            ("train", "train a model (teachers or any single model): natural, pgd_at, trades", "train"),
            ("distill", "distil a student from teachers: ard, rslad, mtard, bmtard", "distill")):
        valid = [n for n in names if bool(METHODS[n].teacher_roles) == (kind == "distill")]
        p = sub.add_parser(command, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{helptext}.\n\nSettings come from --config (a YAML file, or the name of a "
                                       f"recipe shipped with RobustEdge), then the flags below, then --set key=value "
                                       f"overrides. Under `torchrun --nproc_per_node N` the same command trains with "
                                       f"DDP; --batch-size is the global batch.\nMethods here: {', '.join(valid)}.\n"
                                       f"Shipped recipes: {', '.join(recipe_names())}.")
        p.add_argument("--config", help="YAML recipe: a file, or a shipped recipe name (e.g. cifar10_resnet18_bmtard)")
        p.add_argument("--method", choices=valid, help="training method")
        p.add_argument("--arch", help="model architecture (see `robustedge models`)")
        p.add_argument("--width", type=_typed(options.parse_positive, "--width"), help="width multiplier of the model")
        p.add_argument("--dataset", help="dataset name (see `robustedge datasets`)")
        p.add_argument("--data-root", help="folder holding the dataset")
        p.add_argument("--download", action="store_true", default=None, help="download the dataset if missing")
        p.add_argument("--epochs", type=_count(1, "--epochs"), help="number of epochs")
        p.add_argument("--batch-size", type=_count(1, "--batch-size"), help="global batch size")
        p.add_argument("--lr", type=_typed(options.parse_positive, "--lr"), help="initial learning rate")
        p.add_argument("--eps", type=EPS, help="training attack radius, e.g. 8/255")
        p.add_argument("--step-size", type=_typed(options.parse_positive, "--step-size"),
                       help="training attack step, e.g. 2/255")
        p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], help="mixed precision")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the student and its attack twin (pays off on long GPU runs)")
        p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last memory format (default on: faster convolutions on CPU and GPU)")
        p.add_argument("--fold-attack", action=argparse.BooleanOptionalAction, default=None,
                       help="run the training attack on a conv+BN-folded twin of the student (default on; "
                            "the same function in eval mode with fewer operations)")
        p.add_argument("--teacher-precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="precision of every teacher (default auto: bf16 where the hardware has it)")
        p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under DDP")
        p.add_argument("--qat", action=argparse.BooleanOptionalAction, default=None,
                       help="quantization-aware training: train (and attack) the student as its fake-quantised "
                            "INT8 function (torchao PT2E; docs/design.md, \"Quantization-aware training\")")
        p.add_argument("--qat-from", metavar="FILE",
                       help="QAT fine-tuning: start from this trained float student (implies --qat; its ranges "
                            "are first calibrated on qat.calibration_n training images, as post-training "
                            "quantisation does); use a small --lr")
        p.add_argument("--qat-activations", choices=["uint8", "int8-symmetric", "int8"],
                       help="QAT scheme: uint8 (ONNX Runtime's x86 kernels), int8-symmetric (TensorRT) or int8 "
                            "(ExecuTorch's XNNPACK quantizer, for executorch-int8; needs the mobile extra)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--seed", type=SEED, help="seed of initialisation, data order and attacks")
        p.add_argument("--name", help="run name (folder under --out-dir)")
        p.add_argument("--out-dir", help="where runs are written (default runs/)")
        if kind == "distill":
            p.add_argument("--robust-teacher", help="robust teacher model file (sets teachers.robust.checkpoint)")
            p.add_argument("--clean-teacher", help="clean teacher model file (sets teachers.clean.checkpoint)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="any config field, e.g. --set optim.milestones=[100,150] --set method_args.beta=6")
        p.add_argument("--resume", action="store_true", help="continue the run from its last.safetensors")
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved config (the recipe as it will run), parameter counts and the time "
                            "per epoch estimated from real steps on this device, then stop (missing teacher files: "
                            "random stand-ins)")
        p.add_argument("--timing-steps", type=_count(0, "--timing-steps"), default=2, metavar="N",
                       help="with --dry-run: timed steps after one warm-up (default 2; 0: print the recipe and the "
                            "student's size only, no teachers built, no step run)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_train, kind=kind, valid_methods=valid)


_FLAG_KEYS = {"method": "method", "arch": "model.arch", "width": "model.width", "dataset": "data.name",
              "data_root": "data.root", "download": "data.download", "epochs": "epochs", "batch_size": "batch_size",
              "lr": "optim.lr", "eps": "attack.eps", "step_size": "attack.step_size", "amp": "amp",
              "compile": "compile", "channels_last": "channels_last", "fold_attack": "fold_attack",
              "sync_bn": "sync_bn", "device": "device", "seed": "seed", "name": "name", "out_dir": "out_dir",
              "robust_teacher": "teachers.robust.checkpoint", "clean_teacher": "teachers.clean.checkpoint",
              "qat": "qat.enabled", "qat_from": "qat.from_checkpoint", "qat_activations": "qat.activations"}


def resolve_train_config(args: argparse.Namespace):
    """--config, then explicit flags, then --set overrides; validated as a whole."""
    from robustedge.config import TrainConfig, apply_values, load_config, parse_overrides, validate_config

    cfg = load_config(args.config) if args.config else TrainConfig()
    flags = {key: getattr(args, attr) for attr, key in _FLAG_KEYS.items() if getattr(args, attr, None) is not None}
    if args.qat_from is not None and args.qat is None:
        flags["qat.enabled"] = True
    cfg = apply_values(cfg, {**flags, **parse_overrides(args.overrides)})
    if args.no_progress:
        cfg.progress = False
    if getattr(args, "teacher_precision", None):
        for teacher in cfg.teachers.values():
            teacher.precision = args.teacher_precision
    if cfg.method not in args.valid_methods:
        other = "distill" if args.kind == "train" else "train"
        raise RobustEdgeError(f"method '{cfg.method}' is not a `robustedge {args.kind}` method "
                              f"(use `robustedge {other}`); valid here: {', '.join(args.valid_methods)}")
    return validate_config(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from robustedge.trainer import train

    cfg = resolve_train_config(args)
    if args.dry_run:
        from robustedge.dryrun import dry_run

        print(dry_run(cfg, steps=args.timing_steps), end="")
        return 0
    result = train(cfg, resume=args.resume)
    if result.history and int(os.environ.get("RANK", "0")) == 0:
        best = result.best_path or "none (validation off: eval_n = 0)"
        print(f"done in {result.seconds:.0f} s; best: {best}; last: {result.last_path}; "
              f"metrics: {result.run_dir / 'metrics.csv'}")
    return 0


# --------------------------------------------------------------------------------------------
# quickstart
# --------------------------------------------------------------------------------------------

def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole pipeline on the embedded digits data (offline, CPU)",
                       description="Train a clean teacher (natural) and a robust teacher (TRADES) on the embedded "
                                   "digits data, distil a MobileNetV2 student with B-MTARD, train the same student "
                                   "with PGD-AT as the baseline, evaluate both with the full suite and print a table. "
                                   "Re-running replaces the previous quickstart folder (and nothing else).",
                       formatter_class=_Defaults)
    p.add_argument("--out", default="runs/quickstart", help="output folder")
    p.add_argument("--epochs", type=_count(1, "--epochs"), default=20, help="epochs of each student")
    p.add_argument("--teacher-epochs", type=_count(1, "--teacher-epochs"), default=10, help="epochs of each teacher")
    p.add_argument("--n", type=_count(1, "--n"), default=200, help="test examples in the final evaluation")
    p.add_argument("--attacks", default="all", help="attacks of the final evaluation (comma-separated or "
                   "'all'); the export attacks each INT8 file white-box with those of them that have a white-box "
                   "form (pgd20, cw, autoattack), and DIVA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=SEED, default=0, help="seed of every run")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export + verification step")
    p.add_argument("--qat", action="store_true",
                   help="also fine-tune the B-MTARD student with quantization-aware training, export it to INT8 "
                        "and show float / PTQ INT8 / QAT INT8 side by side, each INT8 file attacked white-box "
                        "(off by default: it takes the quickstart past its 5-minute budget; docs/design.md, section 10)")
    p.add_argument("--qat-epochs", type=_count(1, "--qat-epochs"), default=3, help="epochs of the QAT fine-tune")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from robustedge.suite import parse_attacks
    from robustedge.quickstart import QuickstartSettings, run_quickstart

    run_quickstart(QuickstartSettings(out=Path(args.out), epochs=args.epochs, teacher_epochs=args.teacher_epochs,
                                      eval_n=args.n, device=args.device, seed=args.seed,
                                      attacks=tuple(parse_attacks(args.attacks)), progress=not args.no_progress,
                                      export=not args.no_export, qat=args.qat, qat_epochs=args.qat_epochs))
    return 0


# --------------------------------------------------------------------------------------------
# export / verify
# --------------------------------------------------------------------------------------------

def _add_gate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-drop", type=_typed(options.parse_fraction, "--max-drop"), default=None,
                   help="gate: largest drop (fraction, e.g. 0.05) of an artifact's clean, transfer or worst-case "
                        "accuracy below torch's")
    p.add_argument("--min-agreement", type=_typed(options.parse_fraction, "--min-agreement"), default=None,
                   help="gate: smallest top-1 agreement with torch (fraction, e.g. 0.95)")
    p.add_argument("--allow-flags", action="store_true", default=None,
                   help="report attack-failure flags without failing the gate")


def _gate(args: argparse.Namespace, base=None):
    from robustedge.verify_core import Gate

    return (base or Gate()).override(args.max_drop, args.min_agreement, args.allow_flags)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from robustedge.edge.convert import CALIBRATION_METHODS, INT8_ACTIVATIONS
    from robustedge.verify_core import FORMATS

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX / fp16 / INT8 / TensorRT and re-verify robustness",
        description="Export to a bundle (model files, manifest.json with sha256 hashes, verify.npz, and verify.py: "
                    "the bundle's own torch-free verifier) and verify every artifact through its own runtime: clean "
                    "accuracy, agreement with torch, transfer robustness (PGD-20, AutoAttack crafted on torch), "
                    "black-box Square on the runtime, size, latency. Exits 1 when the gate fails.",
        formatter_class=_Defaults)
    p.add_argument("checkpoint", help=SOURCE_HELP)
    p.add_argument("--formats", default="onnx,onnx-fp16,onnx-int8", help=f"comma-separated: {', '.join(FORMATS)} (ort/ort-int8: ORT format for ONNX Runtime Mobile, "
                        "with the reduced-operator config of a minimal build; ort-int8 also builds onnx-int8, its "
                        "source and its twin's graph)")
    p.add_argument("--out", required=True, help="bundle folder to create (must not exist or be empty)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is a RobustEdge bundle (never any other folder)")
    p.add_argument("--n", type=_count(1, "--n"), default=500, help="test examples used for verification")
    p.add_argument("--calibration-n", type=_count(1, "--calibration-n"), default=512,
                   help="training images for INT8 calibration")
    p.add_argument("--calibration-method", default="minmax", choices=CALIBRATION_METHODS, help="INT8 calibration")
    p.add_argument("--calibrate-adversarial", action="store_true",
                   help="calibrate INT8 on half clean, half PGD-20 examples of the float model")
    p.add_argument("--int8-activations", default="uint8", choices=INT8_ACTIVATIONS,
                   help="activation type of the ONNX INT8 file: uint8 is ONNX Runtime's fast x86 path; int8 for "
                        "runtimes that want signed; TensorRT INT8 engines always use int8-symmetric")
    p.add_argument("--transfer-attacks", default="pgd20,autoattack", help="attacks crafted on torch and replayed")
    p.add_argument("--whitebox-attacks", default="pgd20,cw,autoattack,diva",
                   help="attacks run on the exact differentiable twin of each INT8 artifact and replayed on its "
                        "runtime ('none' to skip); diva maximises float-vs-INT8 disagreement")
    p.add_argument("--flags-n", type=_count(1, "--flags-n"), default=100,
                   help="examples the gradient-based attack-failure checks run on")
    p.add_argument("--square-n", type=_count(0, "--square-n"), default=100,
                   help="examples for the black-box Square attack (0: off)")
    p.add_argument("--square-queries", type=_count(1, "--square-queries"), default=5000,
                   help="Square's query budget (AutoAttack's 5000)")
    p.add_argument("--data-root", default=None, help="dataset folder (not needed for digits)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of calibration sampling and the attacks")
    p.add_argument("--device", default="auto", help="where the torch side runs (transfer and white-box attacks, "
                                                    "gradient checks): auto (CUDA when present), cpu, cuda or cuda:N")
    _add_gate(p)
    _add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", help="re-verify an export bundle (hashes, accuracy, robustness, latency)",
                       description="Check the manifest and every file against its sha256, then re-run the "
                                   "verification table through each runtime and apply the gate (exit 1 when it "
                                   "fails). `python BUNDLE/verify.py` runs the same checks without torch.")
    p.add_argument("bundle", help="a folder written by `robustedge export`")
    p.add_argument("--square-n", type=_count(0, "--square-n"), default=None,
                   help="run a fresh Square attack on N examples of each runtime (default: replay the stored "
                        "Square examples; 0: leave Square out)")
    p.add_argument("--out", default=None,
                   help="folder for verify.json and verify.md (default: BUNDLE-verify beside the bundle; never "
                        "inside it: the bundle stays as exported)")
    _add_gate(p)
    p.set_defaults(func=cmd_verify)


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="turn a foreign state dict into a RobustEdge checkpoint with its metadata",
                       description="Load a .pt/.pth/.safetensors state dict into a registry architecture (strictly, "
                                   "weights-only) and write it as a self-describing RobustEdge checkpoint, so eval, "
                                   "export, app and teachers need no --arch again.",
                       formatter_class=_Defaults)
    p.add_argument("file", help="the foreign state dict (.pt, .pth, .safetensors)")
    p.add_argument("--out", required=True, help="the .safetensors checkpoint to write (never overwritten)")
    _add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from robustedge.checkpoint import save_model
    from robustedge.loading import ROBUSTBENCH_PREFIX, load

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RobustEdgeError(f"--out must end in .safetensors, got {out.name}")
    if out.exists():
        raise RobustEdgeError(f"{out} exists; choose another --out (import never overwrites)")
    if not out.parent.is_dir():
        raise RobustEdgeError(f"folder {out.parent} does not exist")
    if args.file.startswith(ROBUSTBENCH_PREFIX) or args.arch is None:
        raise RobustEdgeError("import needs a state dict file and --arch (RobustBench models are loaded by name "
                              "wherever a model is taken)")
    model, meta = load(args.file, facts=_facts(args), device="cpu")  # read to be written back
    if meta.extra.get("source", {}).get("kind") != "state dict":
        raise RobustEdgeError(f"{args.file} is already a RobustEdge checkpoint")
    save_model(out, model, meta, exclusive=True)  # another import to the same --out may have won meanwhile
    print(f"wrote {out} ({meta.spec.arch}, {meta.spec.num_classes} classes, {meta.spec.in_channels}x"
          f"{meta.spec.image_size}x{meta.spec.image_size}, dataset {meta.dataset}, eps {meta.eps})")
    return 0


def _report_gate(failures: list[str], where: Path) -> int:
    if failures:
        print("GATE FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"gate passed; bundle: {where}")
    return 0


def _names(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(a.strip() for a in text.split(",") if a.strip())


def cmd_export(args: argparse.Namespace) -> int:
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.runtime import resolve_device
    from robustedge.flags import FlagSettings
    from robustedge.verify_core import format_flags, format_table

    opts = ExportOptions(formats=args.formats, n=args.n, calibration_n=args.calibration_n,
                         calibration_method=args.calibration_method, calibrate_adversarial=args.calibrate_adversarial,
                         int8_activations=args.int8_activations,
                         transfer_attacks=_names(args.transfer_attacks), whitebox_attacks=_names(args.whitebox_attacks),
                         square_n=args.square_n, square_queries=args.square_queries, data_root=args.data_root,
                         seed=args.seed, gate=_gate(args), flags=FlagSettings(n=args.flags_n))
    out = Path(args.out)
    manifest, failures = export_bundle(args.checkpoint, out, opts, progress=lambda m: print(m, file=sys.stderr),
                                       force=args.force, facts=_facts(args), device=resolve_device(args.device))
    print(format_table(manifest["table"]))
    print(format_flags(manifest["flags"]), end="")
    parity = manifest["parity"]
    print(f"{parity['format']} vs {parity['reference']}: max |logit difference| {parity['max_abs_logit_diff']:.2e} "
          f"on {parity['n']} test and random inputs, top-1 agreement {100 * parity['agreement']:.1f}% on the "
          f"{parity['n_agreement']} test inputs")
    for fmt, row in manifest["table"].items():
        if "twin_agreement" in row:
            print(f"{fmt}: its twin agrees with the runtime on {100 * row['twin_agreement']:.1f}% of the clean and "
                  f"adversarial inputs (max |logit difference| {row['twin_max_logit_diff']:.3g})")
    for fmt, why in manifest["skipped"].items():
        print(f"{fmt} not built: {why}")
    return _report_gate(failures, out)


def cmd_verify(args: argparse.Namespace) -> int:
    from robustedge.edge.bundle import verify_bundle, verify_out
    from robustedge.verify_core import Gate, format_flags, format_table, load_manifest

    manifest = load_manifest(Path(args.bundle))
    verify_out(args.bundle, args.out)  # refused before anything runs
    report, failures = verify_bundle(args.bundle, _gate(args, Gate.from_dict(manifest["gate"])), args.square_n,
                                     progress=lambda m: print(m, file=sys.stderr), out=args.out)
    print(format_table(report["table"]))
    print(format_flags(report["flags"]), end="")
    print(f"wrote {Path(report['out']) / 'verify.json'} and verify.md")
    return _report_gate(failures, Path(args.bundle))


# --------------------------------------------------------------------------------------------
# app, report, listings
# --------------------------------------------------------------------------------------------

def _add_app(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="the Streamlit attack demo in the browser",
                       description="Start the Streamlit demo: pick a checkpoint or exported ONNX model from the models "
                                   "folder, or a foreign model named with --model, an image and an attack, and see "
                                   "clean vs adversarial predictions.",
                       formatter_class=_Defaults)
    p.add_argument("--models", default=None,
                   help="folder with checkpoints / export bundles (default: runs/quickstart; with --model, only "
                        "when that folder exists)")
    p.add_argument("--model", dest="sources", action="append", default=[], metavar="SRC",
                   help=SOURCE_HELP + "; repeat for several (the facts below apply to each)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder for test images of models that do not record one (not needed for digits)")
    p.add_argument("--port", type=_typed(options.parse_port, "--port"), default=8501, help="port to serve on (1-65535)")
    p.add_argument("--host", default="localhost", help="address to bind (localhost keeps it private)")
    _add_model_facts(p, dataset_and_eps=True)
    p.set_defaults(func=cmd_app)


def _check_host(host: str, port: int) -> None:
    """An address the server can bind: resolved now, so a typo is one line rather than Streamlit's traceback."""
    import socket

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise RobustEdgeError(f"--host {host!r} cannot be resolved to an address ({exc}); use localhost, 0.0.0.0 "
                              f"or an address of this machine") from None


def cmd_app(args: argparse.Namespace) -> int:
    import subprocess

    from dataclasses import fields

    from robustedge.app import PAGE_SCRIPT
    from robustedge.app.logic import DATA_ROOT_ENV, MODELS_ENV, SOURCES_ENV, foreign_sources
    from robustedge.loading import ROBUSTBENCH_PREFIX, ModelFacts

    given = [f.name for f in fields(ModelFacts) if f.name != "cli" and getattr(args, f.name) != f.default]
    if given and not args.sources:
        raise RobustEdgeError(f"--{given[0].replace('_', '-')} describes a foreign model: name it with --model SRC")
    if len(set(args.sources)) != len(args.sources):
        raise RobustEdgeError("a --model source is given twice")
    folder = Path(args.models or "runs/quickstart")
    if args.models is None and args.sources and not folder.is_dir():
        folder = None  # only the named models
    elif not folder.is_dir():
        raise RobustEdgeError(f"models folder {folder} does not exist; run `robustedge quickstart` first or pass --models")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise RobustEdgeError(f"--data-root {args.data_root} is not a folder")
    _check_host(args.host, args.port)
    # files go to the page as absolute paths: it runs in another process
    sources = [(s, s if s.startswith(ROBUSTBENCH_PREFIX) else str(Path(s).resolve())) for s in args.sources]
    env = {**os.environ, MODELS_ENV: str(folder.resolve()) if folder else "",
           SOURCES_ENV: foreign_sources(sources, _facts(args)) if sources else "",
           DATA_ROOT_ENV: str(Path(args.data_root).resolve()) if args.data_root else ""}
    cmd = [sys.executable, "-m", "streamlit", "run", str(PAGE_SCRIPT), "--server.port", str(args.port),
           "--server.address", args.host, "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    shown = ([f"models: {folder.resolve()}"] if folder else []) + [f"--model {name}" for name, _ in sources]
    print(f"RobustEdge demo on http://{args.host}:{args.port}  ({'; '.join(shown)}; Ctrl+C to stop)")
    return subprocess.call(cmd, env=env)


def _add_report(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--curve-n", type=_count(0, "--curve-n"), default=100,
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


def _add_listing(sub: argparse._SubParsersAction) -> None:
    def lister(names: Callable[[], list[str]]):
        return lambda args: _print_lines(names())

    def models() -> list[str]:
        from robustedge.models import model_names
        return model_names()

    def methods() -> list[str]:
        from robustedge.methods import method_names
        return method_names()

    def datasets() -> list[str]:
        from robustedge.data import DATASETS
        return list(DATASETS)

    def recipes() -> list[str]:
        from robustedge.config import recipe_names
        return recipe_names()

    for name, helptext, names in (("models", "list the model registry", models),
                                  ("methods", "list the training methods", methods),
                                  ("datasets", "list the dataset registry", datasets),
                                  ("recipes", "list the YAML recipes shipped with RobustEdge (for --config)", recipes)):
        sub.add_parser(name, help=helptext).set_defaults(func=lister(names))


def _print_lines(lines: list[str]) -> int:
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustedge", description="Robust distillation, robustness evaluation and verified edge export.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"robustedge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (AutoAttack's per-attack log)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_quickstart(sub)
    _add_training(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_import(sub)
    _add_report(sub)
    _add_app(sub)
    _add_listing(sub)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
