"""Run configuration: plain dataclasses, loadable from YAML, overridable from the command line.

Defaults are the papers' (DESIGN.md section 3): SGD lr 0.1, momentum 0.9, weight decay 2e-4,
batch 128, 300 epochs with lr x0.1 at 215/260/285, eps 8/255, 10 attack steps of 2/255 from
x + 0.001 * N(0, I).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from robustedge.errors import RobustEdgeError


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: str | None = None
    image_size: int | None = None  # None: the dataset's native size
    channels: int | None = None  # None: the dataset's native channels
    val_fraction: float = 0.1  # held out of train for checkpoint selection (never the test set)
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
class AttackConfig:
    """The inner maximisation used during training."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float = 2 / 255
    start: str = "gaussian"  # gaussian (x + init_std * N(0, I)), uniform, none
    init_std: float = 0.001


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
    epochs: int = 300
    batch_size: int = 128
    eval_every: int = 1  # validation clean + PGD-20 every N epochs (and at the last)
    eval_n: int = 512
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


def _from_dict(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, refusing unknown keys with the list of valid ones."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RobustEdgeError(f"config '{where or 'top level'}' must be a mapping, got {type(raw).__name__}")
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
            value = {role: _from_dict(TeacherConfig, t, f"teachers.{role}.") for role, t in value.items()}
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise RobustEdgeError(f"bad config at '{where}': {exc}") from None


def config_from_dict(raw: dict) -> TrainConfig:
    return _from_dict(TrainConfig, raw, "")


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise RobustEdgeError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RobustEdgeError(f"{path} is not valid YAML: {exc}") from None
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
