"""``robustedge train`` and ``robustedge distill``: a run config from --config, the flags and --set, then a run.

The flags that set a config key are the table :func:`config_flags`: each names its config key and its help
text; the flag's name, its argparse type and how it reads as "not given" come from the field of
:class:`robustedge.config.TrainConfig` that the key names, so a flag and the key it sets cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from robustedge import options
from robustedge.cli.common import count, typed
from robustedge.errors import RobustEdgeError

COMMANDS = (("train", "train a model (teachers or any single model): natural, pgd_at, trades", "train"),
            ("distill", "distil a student from teachers: ard, rslad, mtard, bmtard", "distill"))



def _count_from_zero(text: str, name: str) -> int:
    return options.parse_int(text, name, 0)


def _weight(text: str, name: str) -> float:
    return options.check_range(options.parse_number(text, name), name, 0.0)

@dataclass(frozen=True)
class ConfigFlag:
    """A flag that sets one config key: ``key`` is dotted (``model.arch``); ``*`` in it stands for every role of
    an open mapping (``teachers.*.precision`` sets each teacher's, after the config is built)."""

    key: str
    help: str
    name: str | None = None  # the flag without its dashes; default: the field's name with "-" for "_"
    parse: Callable | None = None  # an options parser instead of the one the field's type implies
    negatable: bool = False  # a boolean with a --no-... form (a recipe may have turned it on)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    distill_only: bool = False

    @property
    def field(self) -> dataclasses.Field:
        return config_field(self.key)[0]

    @property
    def flag(self) -> str:
        return "--" + (self.name or self.field.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def config_flags() -> tuple[ConfigFlag, ...]:
    """Every train/distill flag that sets a config key, in --help order (``method``'s choices are the command's)."""
    from robustedge.config import AMP_MODES, PRECISIONS, TEACHER_ROLES
    from robustedge.qat import ACTIVATIONS

    return (
        ConfigFlag("method", "training method"),
        ConfigFlag("model.arch", "model architecture (see `robustedge models`)"),
        ConfigFlag("model.width", "width multiplier of the model"),
        ConfigFlag("data.name", "dataset name (see `robustedge datasets`)", name="dataset"),
        ConfigFlag("data.root", "folder holding the dataset", name="data-root"),
        ConfigFlag("data.download", "download the dataset if missing"),
        ConfigFlag("epochs", "number of epochs"),
        ConfigFlag("batch_size", "global batch size"),
        ConfigFlag("optim.lr", "initial learning rate"),
        ConfigFlag("attack.eps", "training attack radius, e.g. 8/255", parse=options.parse_eps),
        ConfigFlag("attack.step_size", "training attack step, e.g. 2/255"),
        ConfigFlag("amp", "mixed precision", choices=AMP_MODES),
        ConfigFlag("compile", "torch.compile the student and its attack twin (pays off on long GPU runs)",
                   negatable=True),
        ConfigFlag("channels_last", "channels_last memory format (default on: faster convolutions on CPU and GPU)",
                   negatable=True),
        ConfigFlag("fold_attack", "run the training attack on a conv+BN-folded twin of the student (default on; "
                                  "the same function in eval mode with fewer operations)", negatable=True),
        ConfigFlag("teachers.*.precision", "precision of every teacher (default auto: bf16 where the hardware has it)",
                   name="teacher-precision", choices=PRECISIONS),
        ConfigFlag("sync_bn", "SyncBatchNorm under DDP"),
        ConfigFlag("qat.enabled", "quantization-aware training: train (and attack) the student as its "
                                  "fake-quantised INT8 function (torchao PT2E; docs/design/qat.md, \"Quantization-aware "
                                  "training\")", name="qat", negatable=True),
        ConfigFlag("qat.from_checkpoint", "QAT fine-tuning: start from this trained float student (implies --qat; "
                                          "without --config, the run is the config FILE was trained with, turned "
                                          "into its QAT fine-tune: 30%% of its epochs (at least 2), cosine from a tenth of its "
                                          "lr, the float student as a teacher, docs/design/qat.md section 10; the "
                                          "ranges are first calibrated on qat.calibration_n training images, as "
                                          "post-training quantisation does)",
                   name="qat-from", metavar="FILE"),
        ConfigFlag("qat.activations", "QAT scheme: uint8 (ONNX Runtime's x86 kernels), int8-symmetric (TensorRT) or "
                                      "int8 (ExecuTorch's XNNPACK quantizer, for executorch-int8; needs the mobile "
                                      "extra)", name="qat-activations", choices=ACTIVATIONS),
        ConfigFlag("qat.freeze_epochs", "QAT: train the last N epochs with the observers and batch-norm statistics "
                                        "frozen, against the scales the export ships (the fine-tune recipe: 2; "
                                        "0: never)",
                   name="qat-freeze-epochs", parse=_count_from_zero, metavar="N"),
        ConfigFlag("qat.carry_method_state", "QAT fine-tuning: start the method from the float run's state "
                                             "(B-MTARD's temperatures and loss weights; its last.safetensors beside "
                                             "--qat-from; on in the fine-tune recipe when that file is there)",
                   name="qat-carry-method-state", negatable=True),
        ConfigFlag("qat.float_teacher", "QAT fine-tuning: weight W of the float student (--qat-from) as an extra "
                                        "teacher of the fake-quantised one, on x and the training attack's x' "
                                        "(the fine-tune recipe: 1; 0: off)", name="qat-float-teacher", parse=_weight,
                   metavar="W"),
        ConfigFlag("qat.disagreement", "QAT fine-tuning: weight W of a second training attack aimed at what the "
                                       "export measures: each step, DIVA examples (float-vs-INT8 disagreement) "
                                       "against the fake-quantised student, on which it learns the float "
                                       "student's answer (docs/design/qat.md section 10; off in the recipe: "
                                       "docs/results/qat.md)", name="qat-disagreement", parse=_weight, metavar="W"),
        ConfigFlag("qat.float_control", "with --qat-from: its fine-tune in float instead, without fake quantisers "
                                        "(same start, schedule, method state and float teacher; the run "
                                        "<name>_float_control): the control that tells what QAT buys from what the "
                                        "extra training buys (docs/design/qat.md section 10)",
                   name="qat-float-control"),
        ConfigFlag("device", "auto, cpu, cuda or cuda:N"),
        ConfigFlag("seed", "seed of initialisation, data order and attacks", parse=options.parse_seed),
        ConfigFlag("name", "run name (folder under --out-dir)"),
        ConfigFlag("out_dir", "where runs are written (default runs/)"),
        *(ConfigFlag(f"teachers.{role}.checkpoint", f"{role} teacher model file (sets teachers.{role}.checkpoint)",
                     name=f"{role}-teacher", distill_only=True) for role in TEACHER_ROLES),
    )


@functools.cache
def config_field(key: str) -> tuple[dataclasses.Field, Any]:
    """The field of :class:`TrainConfig` (or of a config nested in it) that dotted ``key`` names, and its type
    without ``| None``; in an open mapping such as ``teachers`` the part after it is a key (a role, or ``*``)."""
    from robustedge.config import TrainConfig

    cls, parts = TrainConfig, key.split(".")
    while True:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if parts[0] not in fields:
            raise KeyError(f"no config key {key!r}")
        field, hint = fields[parts[0]], typing.get_type_hints(cls)[parts[0]]
        parts = parts[1:]
        if typing.get_origin(hint) is dict:  # an open mapping: skip its key
            parts, hint = parts[1:], typing.get_args(hint)[1]
        if not parts:
            if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | None: a str
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            return field, hint
        cls = hint


# the argparse type a field's type implies: counts are >= 1, other numbers > 0 (ranges the config checks too)
TYPE_PARSERS: dict[type, tuple] = {int: (options.parse_int, 1), float: (options.parse_positive,)}


def _add_config_flag(p: argparse.ArgumentParser, flag: ConfigFlag, choices=None) -> None:
    _, hint = config_field(flag.key)
    kwargs: dict[str, Any] = {"help": flag.help}
    if hint is bool:  # default None: "not given", so the recipe's value stays
        kwargs |= {"action": argparse.BooleanOptionalAction if flag.negatable else "store_true", "default": None}
    elif flag.parse is not None:
        kwargs["type"] = typed(flag.parse, flag.flag)
    elif hint in TYPE_PARSERS:
        parse, *extra = TYPE_PARSERS[hint]
        kwargs["type"] = typed(parse, flag.flag, *extra)
    elif hint is not str:
        raise TypeError(f"config key {flag.key!r} ({hint}) has no flag type")
    if choices or flag.choices:
        kwargs["choices"] = list(choices or flag.choices)
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    p.add_argument(flag.flag, **kwargs)


def add(sub: argparse._SubParsersAction) -> None:
    from robustedge.config import recipe_names
    from robustedge.methods import METHODS, method_names

    names = method_names()
    for command, helptext, kind in COMMANDS:
        valid = [n for n in names if bool(METHODS[n].teacher_roles) == (kind == "distill")]
        p = sub.add_parser(command, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{helptext}.\n\nSettings come from --config (a YAML file, or the name of a "
                                       f"recipe shipped with RobustEdge), then the flags below, then --set key=value "
                                       f"overrides. Under `torchrun --nproc_per_node N` the same command trains with "
                                       f"DDP; --batch-size is the global batch.\nMethods here: {', '.join(valid)}.\n"
                                       f"Shipped recipes: {', '.join(recipe_names())}.")
        p.add_argument("--config", help="YAML recipe: a file, or a shipped recipe name (e.g. cifar10_resnet18_bmtard)")
        for flag in _flags(kind):
            _add_config_flag(p, flag, choices=valid if flag.key == "method" else None)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="any config field, e.g. --set optim.milestones=[100,150] --set method_args.beta=6")
        p.add_argument("--resume", action="store_true", help="continue the run from its last.safetensors")
        p.add_argument("--dry-run", action="store_true",
                       help="print the resolved config (the recipe as it will run), parameter counts and the time "
                            "per epoch estimated from real steps on this device, then stop (missing teacher files: "
                            "random stand-ins)")
        p.add_argument("--timing-steps", type=count(0, "--timing-steps"), default=2, metavar="N",
                       help="with --dry-run: timed steps after one warm-up (default 2; 0: print the recipe and the "
                            "student's size only, no teachers built, no step run)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=cmd_train, kind=kind, valid_methods=valid)


def _flags(kind: str) -> list[ConfigFlag]:
    return [f for f in config_flags() if kind == "distill" or not f.distill_only]


def resolve_train_config(args: argparse.Namespace):
    """--config, then explicit flags, then --set overrides; validated as a whole."""
    from robustedge.config import TrainConfig, apply_values, load_config, parse_overrides, validate_config

    given = [(f, getattr(args, f.dest)) for f in _flags(args.kind) if getattr(args, f.dest) is not None]
    values = {f.key: value for f, value in given if "*" not in f.key}
    if args.qat_from is not None and args.qat is None and not args.qat_float_control:
        values["qat.enabled"] = True
    values |= parse_overrides(args.overrides)
    if args.config:
        cfg = load_config(args.config)
    elif args.qat_from is not None:  # the float run's own config, as its QAT fine-tune (robustedge/qat_recipe.py)
        from robustedge.qat_recipe import float_control_config, recipe_config

        cfg = recipe_config(args.qat_from, values.get("epochs"))
        if args.qat_float_control:
            cfg = float_control_config(cfg)
    else:
        cfg = TrainConfig()
    cfg = apply_values(cfg, values)
    if args.no_progress:
        cfg.progress = False
    for f, value in given:  # every role's field (teachers.*.precision), whichever set the teachers
        if "*" in f.key:
            mapping, _, name = f.key.split(".")
            for entry in getattr(cfg, mapping).values():
                setattr(entry, name, value)
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
