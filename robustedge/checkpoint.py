"""Model files: safetensors weights with their JSON metadata in the same file, written atomically.

One ``.safetensors`` file is a complete, self-describing model: the header's ``robustedge`` entry
holds the architecture spec (name, classes, channels, width, normalisation, input size) and the
run's facts (dataset, eps, method, metrics, library version). safetensors cannot execute code on
load, which is the point; weights from elsewhere (``.pt``/``.pth``) are read with
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from robustedge import __version__
from robustedge.errors import RobustEdgeError
from robustedge.models import Classifier, build_model

FORMAT = "robustedge/1"


# --------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file and a crash leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------
# Model spec + metadata
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """Everything needed to rebuild a registry model before loading its weights."""

    arch: str
    num_classes: int
    in_channels: int = 3
    width: float = 1.0
    image_size: int = 32
    mean: list[float] | None = None
    std: list[float] | None = None

    def build(self) -> Classifier:
        norm = (self.mean, self.std) if self.mean is not None else None
        return build_model(self.arch, self.num_classes, self.in_channels, self.width, norm, self.image_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


@dataclass
class ModelMeta:
    spec: ModelSpec
    dataset: str = "unknown"
    eps: float | None = None
    method: str | None = None
    classes: list[str] | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    version: str = __version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        raw = json.loads(text)
        raw["spec"] = ModelSpec(**raw["spec"])
        return cls(**raw)


def save_model(path: str | os.PathLike, model: nn.Module, meta: ModelMeta) -> Path:
    """Write weights + metadata to one safetensors file, atomically."""
    from safetensors.torch import save_file

    model = unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "robustedge": meta.to_json()})
    return Path(path)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _check_file(path: Path) -> None:
    if not path.exists():
        raise RobustEdgeError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise RobustEdgeError(f"checkpoint is not a file: {path}")


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _meta_from_header(path: Path, header: dict[str, str]) -> "ModelMeta":
    if header.get("format") != FORMAT or "robustedge" not in header:
        raise RobustEdgeError(f"{path} is a safetensors file but not a RobustEdge model (no model metadata); "
                              f"load foreign weights with an explicit architecture instead")
    try:
        return ModelMeta.from_json(header["robustedge"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RobustEdgeError(f"{path}: malformed RobustEdge metadata ({exc})") from None


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The metadata of a RobustEdge model file, without loading its weights."""
    path = Path(path)
    return _meta_from_header(path, _read_header(path))


def _read_robustedge_file(path: Path) -> tuple[dict[str, str], ModelMeta, dict[str, torch.Tensor]]:
    """Header, metadata and every tensor of a RobustEdge file (model or training state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = _read_header(path)
    meta = _meta_from_header(path, header)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustEdgeError(f"{path}: cannot read tensors (truncated or corrupt?): {exc}") from None
    return header, meta, tensors


def _model_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Classifier, ModelMeta]:
    """Rebuild the model a RobustEdge file describes and load its weights strictly (eval mode).

    A run's ``last.safetensors`` (a training state) works too: its model part is used.
    """
    path = Path(path)
    header, meta, state = _read_robustedge_file(path)
    if header.get("kind") == TRAINING_KIND:
        state = _model_part(state)
    model = meta.spec.build()
    load_state_strict(model, state, source=str(path), arch=meta.spec.arch)
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------
# Weights from elsewhere
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``.pt``/``.pth`` file, never unpickling code.

    Unwraps the usual containers (``{'state_dict': ...}``, ``{'model': ...}``) and the
    ``module.`` prefix DataParallel leaves behind.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise RobustEdgeError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RobustEdgeError(f"{path}: not a weights-only torch checkpoint ({first})") from None
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RobustEdgeError(f"{path} does not hold a model state dict")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _preview(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the keys and shapes that differ."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {_preview(shapes, 3)}")
    if problems:
        raise RobustEdgeError(f"{source} does not fit architecture '{arch}': " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_weights(spec: ModelSpec, path: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier:
    """Build ``spec`` and load weights from any supported file into it, strictly."""
    model = spec.build()
    load_state_strict(model, read_state_dict(path), source=str(path), arch=spec.arch)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a teacher runs in; ``auto`` is bf16 where the hardware computes it natively
    (CUDA with bf16, CPUs with AVX512-BF16/AMX through oneDNN) and fp32 elsewhere."""
    if precision == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and torch.backends.mkldnn.is_available() and \
                bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    if precision not in _PRECISIONS:
        raise RobustEdgeError(f"unknown teacher precision '{precision}'; valid: auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


class FrozenTeacher(nn.Module):
    """A teacher that only infers: eval mode forever, no parameter gradients, under inference
    mode, optionally in a lower precision than the student; always returns fp32 logits.

    Its soft labels only enter the loss as constants, so bf16 (8 bits of mantissa) changes a target
    probability by well under 1%; the benchmark (bench/train_step.py) checks the step's loss stays
    within tolerance of an fp32 teacher's.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dtype = teacher_dtype(precision, device)
        self.model = model.to(device=device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # a teacher never leaves eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(x.detach().to(self.dtype)).float()
        # inference tensors cannot be saved for backward; the KL terms save their target
        return logits.clone()


ROBUSTBENCH_PREFIX = "robustbench:"
ROBUSTBENCH_DIR = "teachers/robustbench"  # where robustbench caches the weights it downloads


def load_robustbench(name: str, dataset: str | None, device: torch.device | str = "cpu",
                     model_dir: str = ROBUSTBENCH_DIR) -> nn.Module:
    """A RobustBench L-inf model by its leaderboard name, through ``robustbench.utils.load_model``.

    RobustBench models take [0, 1] pixels and normalise inside, as ours do, so they can be
    teachers as they are (they are not folded: their architectures are not all traceable).
    """
    try:
        from robustbench.utils import load_model as robustbench_load
    except ImportError:
        raise RobustEdgeError(f"teacher '{ROBUSTBENCH_PREFIX}{name}' needs the RobustBench package: "
                              f"pip install 'robustedge[zoo]'") from None
    if dataset not in ("cifar10", "cifar100", "imagenet"):
        raise RobustEdgeError(f"RobustBench has no L-inf models for dataset '{dataset}' (cifar10, cifar100, imagenet)")
    try:
        model = robustbench_load(model_name=name, dataset=dataset, threat_model="Linf", model_dir=model_dir)
    except Exception as exc:  # robustbench raises KeyError/ValueError/HTTP errors for unknown names or no network
        raise RobustEdgeError(f"RobustBench could not load '{name}' ({dataset}, Linf): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return model.to(device).eval()


def load_teacher(cfg: Any, num_classes: int, in_channels: int, image_size: int,
                 device: torch.device | str = "cpu", dataset: str | None = None) -> FrozenTeacher:
    """A teacher from a RobustEdge model file, from foreign weights plus a registry ``arch``, or
    ``robustbench:<name>`` (the ``zoo`` extra) for any RobustBench L-inf model of ``dataset``."""
    if not cfg.checkpoint:
        raise RobustEdgeError("a teacher needs 'checkpoint' (a model file or robustbench:<name>)")
    if str(cfg.checkpoint).startswith(ROBUSTBENCH_PREFIX):
        model = load_robustbench(str(cfg.checkpoint)[len(ROBUSTBENCH_PREFIX):], dataset, device)
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size, device=device))
        if out.shape[-1] != num_classes:
            raise RobustEdgeError(f"teacher {cfg.checkpoint} predicts {out.shape[-1]} classes; the data has {num_classes}")
        return FrozenTeacher(model, cfg.precision, device)
    path = Path(cfg.checkpoint)
    if cfg.arch is None:
        model, meta = load_model(path, device)
        spec = meta.spec
    else:
        spec = ModelSpec(cfg.arch, num_classes, in_channels, cfg.width, image_size, cfg.mean, cfg.std)
        model = load_weights(spec, path, device)
    if spec.num_classes != num_classes or spec.in_channels != in_channels:
        raise RobustEdgeError(f"teacher {path} is {spec.arch} with {spec.num_classes} classes and "
                              f"{spec.in_channels} input channels; the data has {num_classes} and {in_channels}")
    from robustedge.models import fold_batchnorm

    # a teacher only infers, so its BNs are folded into its convs once, here (see models/folding.py)
    return FrozenTeacher(fold_batchnorm(model), cfg.precision, device)


# --------------------------------------------------------------------------------------------
# Training state (resume): one safetensors file, tensors + a JSON tree of everything else
# --------------------------------------------------------------------------------------------

def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by references, collecting them in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj.get("tuple") else items
    return obj


TRAINING_KIND = "training-state"


def save_training_state(path: str | os.PathLike, model: nn.Module, meta: ModelMeta, state: dict) -> Path:
    """Model weights (prefixed ``model.``) plus optimiser/scheduler/method/... state, atomically.

    The file is also a valid model file: :func:`load_model` reads its ``model.`` part.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tree = _flatten(state, "state", tensors)
    header = {"format": FORMAT, "robustedge": meta.to_json(), "kind": TRAINING_KIND,
              "training": json.dumps(tree, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelMeta, dict]:
    """(model weights, metadata, the rest of the state) of a run's ``last.safetensors``."""
    path = Path(path)
    header, meta, tensors = _read_robustedge_file(path)
    if header.get("kind") != TRAINING_KIND:
        raise RobustEdgeError(f"{path} is a model file, not a training state; resume needs a run's last.safetensors")
    return _model_part(tensors), meta, _unflatten(json.loads(header["training"]), tensors)
