"""Run configuration: plain dataclasses, loadable from YAML, overridable from the command line.

Defaults are the papers' (docs/design/training.md, "Training methods"): SGD lr 0.1, momentum 0.9, weight
decay 2e-4, batch 128, 300 epochs with lr x0.1 at 215/260/285, eps 8/255, 10 attack steps of 2/255
from x + 0.001 * N(0, I).

Every value is type-checked against its field when it is read (YAML, ``--set``, flags or the API),
so ``epochs: "ten"`` is a one-line error naming the key, the expected type and the value; numbers
may be written as fractions (``eps: 8/255``). :func:`validate_config` then checks ranges and names
before a run touches disk.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustedge.attack_table import AttackConfig
from robustedge.errors import RobustEdgeError
from robustedge.options import check_range, parse_int, parse_number, parse_seed

TEACHER_ROLES = ("robust", "clean")  # every method's teacher_roles come from these
RECIPES = Path(__file__).with_name("configs")  # recipes shipped with the package


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str | None = None
    image_size: int | None = None  # None: the dataset's native size
    channels: int | None = None  # None: the dataset's native channels
    val_fraction: float = 0.1  # held out of train for checkpoint selection (never the test set)
    train_n: int | None = None  # train on a seeded random N of the training split: a quick check, not a result
    seed: int = 0
    download: bool = False
    augment: bool = True  # random crop (zero padding) + horizontal flip, on the device
    padding: int = 4
    flip: bool = True


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    width: float = 1.0
    mean: list[float] | None = None  # normalisation inside the model; inputs stay in [0, 1]
    std: list[float] | None = None


@dataclass
class TeacherConfig:
    checkpoint: str = ""  # a RobustEdge .safetensors, or a .pt/.pth/.safetensors state dict with `arch`
    arch: str | None = None  # needed only for foreign weights
    width: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16 | fp16: teachers only infer


@dataclass
class QATConfig:
    """Quantization-aware training (robustedge/qat.py): the student trains, and is attacked, as the
    fake-quantised INT8 function it will be exported as."""

    enabled: bool = False
    activations: str = "uint8"  # uint8 (ONNX Runtime's x86 scheme) | int8-symmetric (TensorRT) | int8 (XNNPACK)
    from_checkpoint: str | None = None  # fine-tune a trained float student (a RobustEdge model file)
    calibration_n: int = 512  # with from_checkpoint: training images that set the ranges first (PTQ start); 0: none
    # the last this-many epochs train against fixed scales and batch-norm statistics (observers off, BN in
    # eval mode): what the export ships, as the field's QAT recipes end; 0: never frozen
    freeze_epochs: int = 0
    # with from_checkpoint: start the method from the float run's state (B-MTARD's temperatures, loss weights and
    # first losses) read from the last.safetensors beside the checkpoint, instead of the method's initial values
    carry_method_state: bool = False
    # with from_checkpoint: the float student as an extra teacher of the fake-quantised one, on x and on the
    # method's x' (weight * (KL(F(x) || Q(x)) + KL(F(x') || Q(x'))), the methods' KL scale); 0: off
    float_teacher: float = 0.0
    # with from_checkpoint and enabled: the training attack aimed at what the export measures as well. Each step,
    # DIVA examples x_d (float-vs-INT8 disagreement, robustedge.attacks.disagreement) are crafted against the
    # fake-quantised student in eval mode, with the training attack's eps, step size and steps, and
    # weight * KL(F(x_d) || Q(x_d)) is added to the loss; 0: off
    disagreement: float = 0.0
    # with from_checkpoint and enabled: false: the same fine-tune (start, schedule, method state, float teacher)
    # in float, without fake quantisers: the control that tells what QAT buys from what more training buys
    # (bench/qat_compare.py --control)
    float_control: bool = False


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # piecewise | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [215, 260, 285])
    gamma: float = 0.1


@dataclass
class TrainConfig:
    name: str = "run"
    method: str = "natural"
    method_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)  # roles: "robust", "clean"
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    epochs: int = 300
    batch_size: int = 128
    eval_every: int = 1  # validation clean + PGD-20 every N epochs (and at the last)
    eval_n: int = 512  # validation examples; 0 turns validation (and best.safetensors) off
    eval_eps: float | None = None  # None: attack.eps
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    channels_last: bool = True
    fold_attack: bool = True  # attack a BN-folded twin of the student (same function, fewer ops)
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs"
    log_every: int = 10  # steps between host syncs (progress bar, NaN guard)
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------------------------
# Types: every value checked against its field's annotation
# --------------------------------------------------------------------------------------------

def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotated type, or a one-line error naming key, type and value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner[0], key)
        except RobustEdgeError:
            raise RobustEdgeError(f"config key '{key}' expects {_describe(hint)}, got {value!r}") from None
    bad = RobustEdgeError(f"config key '{key}' expects {_describe(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return parse_number(value, f"config key '{key}'")
            except RobustEdgeError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    return value


def _from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys and values of the wrong type."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RobustEdgeError(f"config '{where.rstrip('.') or 'top level'}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise RobustEdgeError(f"unknown config key '{where}{key}'; valid keys: {', '.join(sorted(names))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{where}{key}.")
        elif key == "teachers":
            if not isinstance(value, dict):
                raise RobustEdgeError("config 'teachers' must map a role (robust, clean) to a teacher")
            for role in value:
                if role not in TEACHER_ROLES:
                    raise RobustEdgeError(f"unknown teacher role '{role}'; valid roles: {', '.join(TEACHER_ROLES)}")
            value = {role: _from_dict(TeacherConfig, t, f"teachers.{role}.") for role, t in value.items()}
        else:
            value = _coerce(value, hint, f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(raw: dict) -> TrainConfig:
    return _from_dict(TrainConfig, raw, "")


def resolve_recipe(path_or_name: str | Path) -> Path:
    """A config file path, or the name of a recipe shipped with RobustEdge (``cifar10_resnet18_bmtard``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    if path.exists():
        raise RobustEdgeError(f"config {path} is not a file")
    raise RobustEdgeError(f"config file not found: {path} (shipped recipes: {', '.join(recipe_names())})")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_config(path: str | Path) -> TrainConfig:
    path = resolve_recipe(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RobustEdgeError(f"{path} is not a YAML text file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise RobustEdgeError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RobustEdgeError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return config_from_dict(raw)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings to {key: value}, values parsed as YAML (0.1, true, [1, 2], null)."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RobustEdgeError(f"override '{item}' must look like key.sub=value")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            values[key.strip()] = text
    return values


def apply_values(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A new config with dotted keys set; open mappings (method_args, teachers) may gain keys."""
    raw = config_to_dict(cfg)
    for key, value in values.items():
        node, parts = raw, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            open_mapping = parts[0] in ("method_args", "teachers") and depth <= 1
            if not isinstance(node.get(part), dict):
                if not open_mapping:
                    raise RobustEdgeError(f"unknown config key '{key}'")
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return config_from_dict(raw)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Ranges and names, checked before a run touches disk
# --------------------------------------------------------------------------------------------

AMP_MODES = ("auto", "off", "bf16", "fp16")
SCHEDULES = ("piecewise", "cosine", "constant")
STARTS = ("auto", "gaussian", "uniform", "uniform_unprojected", "none")
ATTACK_MODES = ("auto", "eval", "train")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _choice(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise RobustEdgeError(f"config key '{key}' must be one of {', '.join(valid)}, got {value!r}")


def _check_normalization(mean, std, where: str) -> None:
    if (mean is None) != (std is None):
        raise RobustEdgeError(f"config '{where}mean' and '{where}std' must be given together")
    if mean is not None and (len(mean) != len(std) or any(s <= 0 for s in std)):
        raise RobustEdgeError(f"config '{where}mean'/'{where}std' need equal lengths and positive std")


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Check every range and name of ``cfg`` (one line per problem, the first one raised)."""
    from robustedge.data import DATASETS
    from robustedge.methods import get_method
    from robustedge.models import check_arch
    from robustedge.runtime import resolve_device

    for key in ("epochs", "batch_size", "eval_every", "log_every"):
        parse_int(getattr(cfg, key), f"config key '{key}'", 1)
    parse_int(cfg.eval_n, "config key 'eval_n' (0 turns validation off)", 0)
    parse_seed(cfg.seed, "config key 'seed'")
    if cfg.eval_eps is not None:
        check_range(cfg.eval_eps, "config key 'eval_eps'", 0.0, 1.0)
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise RobustEdgeError(f"config key 'name' must be a folder name (no '/'), got {cfg.name!r}")
    _choice(cfg.amp, AMP_MODES, "amp")
    method = get_method(cfg.method)
    method.check_args(cfg.method_args)
    a = cfg.attack
    check_range(a.eps, "config key 'attack.eps'", 0.0, 1.0)
    parse_int(a.steps, "config key 'attack.steps'", 0)
    if a.steps > 0:
        check_range(a.step_size, "config key 'attack.step_size'", 0.0, low_open=True)
    _choice(a.start, STARTS, "attack.start")
    _choice(a.mode, ATTACK_MODES, "attack.mode")
    check_range(a.init_std, "config key 'attack.init_std'", 0.0)
    o = cfg.optim
    check_range(o.lr, "config key 'optim.lr'", 0.0, low_open=True)
    check_range(o.momentum, "config key 'optim.momentum'", 0.0, 1.0, high_open=True)
    check_range(o.weight_decay, "config key 'optim.weight_decay'", 0.0)
    check_range(o.gamma, "config key 'optim.gamma'", 0.0, low_open=True)
    _choice(o.schedule, SCHEDULES, "optim.schedule")
    for i, m in enumerate(o.milestones):
        parse_int(m, f"config key 'optim.milestones[{i}]'", 0)
    d = cfg.data
    if d.name not in DATASETS:
        raise RobustEdgeError(f"config key 'data.name': unknown dataset '{d.name}'; valid: {', '.join(DATASETS)}")
    check_range(d.val_fraction, "config key 'data.val_fraction'", 0.0, 1.0, high_open=True)
    parse_seed(d.seed, "config key 'data.seed'")
    if d.train_n is not None:
        parse_int(d.train_n, "config key 'data.train_n'", 1)
    parse_int(d.padding, "config key 'data.padding'", 0)
    for key in ("image_size", "channels"):
        if getattr(d, key) is not None:
            parse_int(getattr(d, key), f"config key 'data.{key}'", 1)
    check_arch(cfg.model.arch)
    check_range(cfg.model.width, "config key 'model.width'", 0.0, low_open=True)
    _check_normalization(cfg.model.mean, cfg.model.std, "model.")
    for role, teacher in cfg.teachers.items():
        where = f"teachers.{role}."
        if teacher.arch is not None:
            check_arch(teacher.arch)
        check_range(teacher.width, f"config key '{where}width'", 0.0, low_open=True)
        _check_normalization(teacher.mean, teacher.std, where)
        _choice(teacher.precision, PRECISIONS, f"{where}precision")
    for role in method.teacher_roles:
        if not (cfg.teachers.get(role) and cfg.teachers[role].checkpoint):
            raise RobustEdgeError(f"method '{cfg.method}' needs a {role} teacher (config "
                                  f"'teachers.{role}.checkpoint', or --{role}-teacher FILE)")
    resolve_device(cfg.device)
    if cfg.amp == "fp16" and resolve_device(cfg.device).type != "cuda":
        raise RobustEdgeError("amp fp16 needs CUDA; use amp bf16 or off on the CPU")
    _validate_qat(cfg)
    if cfg.qat.disagreement and (not method.adversarial or a.steps < 1):
        raise RobustEdgeError(f"config key 'qat.disagreement' crafts its examples with the training attack's budget; "
                              f"method '{cfg.method}' with attack.steps {a.steps} has no training attack")
    return cfg


def _validate_qat(cfg: TrainConfig) -> None:
    from robustedge.qat import ACTIVATIONS

    q = cfg.qat
    _choice(q.activations, ACTIVATIONS, "qat.activations")
    parse_int(q.calibration_n, "config key 'qat.calibration_n'", 0)
    parse_int(q.freeze_epochs, "config key 'qat.freeze_epochs'", 0)
    if q.freeze_epochs and not q.enabled:
        raise RobustEdgeError("config key 'qat.freeze_epochs' needs qat.enabled: true")
    if q.freeze_epochs > cfg.epochs:
        raise RobustEdgeError(f"config key 'qat.freeze_epochs' is {q.freeze_epochs}, more than the run's "
                              f"{cfg.epochs} epochs")
    q.float_teacher = check_range(parse_number(q.float_teacher, "config key 'qat.float_teacher'"),
                                  "config key 'qat.float_teacher'", 0.0)
    if q.float_teacher and q.from_checkpoint is None:
        raise RobustEdgeError("config key 'qat.float_teacher' needs qat.from_checkpoint (the float student that "
                              "teaches the fake-quantised one)")
    q.disagreement = check_range(parse_number(q.disagreement, "config key 'qat.disagreement'"),
                                 "config key 'qat.disagreement'", 0.0)
    if q.disagreement and (q.from_checkpoint is None or not q.enabled):
        raise RobustEdgeError("config key 'qat.disagreement' needs qat.from_checkpoint and qat.enabled: true (the "
                              "float student and the fake-quantised one that the attack sets against each other)")
    if q.carry_method_state and q.from_checkpoint is None:
        raise RobustEdgeError("config key 'qat.carry_method_state' needs qat.from_checkpoint (the float run to carry "
                              "the method state from)")
    if q.from_checkpoint is not None and not Path(q.from_checkpoint).is_file():
        raise RobustEdgeError(f"config key 'qat.from_checkpoint': no such file {q.from_checkpoint}")
    if q.carry_method_state:
        last = Path(q.from_checkpoint).parent / "last.safetensors"
        if not last.is_file():
            raise RobustEdgeError(f"qat.carry_method_state needs the float run's training state {last} (the run "
                                  f"folder of {q.from_checkpoint}); copy it beside the checkpoint or set "
                                  f"carry_method_state: false (--no-qat-carry-method-state)")
        from robustedge.checkpoint import trained_method

        method = trained_method(last)
        if method != cfg.method:
            raise RobustEdgeError(f"qat.carry_method_state: {last} was trained with method '{method}', this run "
                                  f"with '{cfg.method}'; there is no method state to carry "
                                  f"(--no-qat-carry-method-state)")
    if q.float_control and (q.enabled or q.from_checkpoint is None):
        raise RobustEdgeError("config key 'qat.float_control' runs the fine-tune of qat.from_checkpoint in float: it "
                              "needs qat.from_checkpoint and qat.enabled: false (--qat-from FILE --qat-float-control)")
    if q.from_checkpoint is not None and not q.enabled and not q.float_control:
        raise RobustEdgeError("config key 'qat.from_checkpoint' needs qat.enabled: true (or --qat-from FILE), or "
                              "qat.float_control: true for the same fine-tune in float")
    if q.enabled and cfg.amp in ("bf16", "fp16"):
        raise RobustEdgeError(f"quantization-aware training runs in fp32 (under amp {cfg.amp} the fake quantisers "
                              f"would see {cfg.amp} values, not the INT8 function the export computes); "
                              f"set amp: off or auto")
    if q.enabled and cfg.compile:
        raise RobustEdgeError("quantization-aware training does not support compile: true; set compile: false")
