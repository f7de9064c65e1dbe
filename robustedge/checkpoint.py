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
        return build_model(self.arch, self.num_classes, self.in_channels, self.width, norm)

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


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The metadata of a RobustEdge model file, without loading its weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if header.get("format") != FORMAT or "robustedge" not in header:
        raise RobustEdgeError(f"{path} is a safetensors file but not a RobustEdge model (no model metadata); "
                              f"load foreign weights with an explicit architecture instead")
    try:
        return ModelMeta.from_json(header["robustedge"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RobustEdgeError(f"{path}: malformed RobustEdge metadata ({exc})") from None


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Classifier, ModelMeta]:
    """Rebuild the model a RobustEdge file describes and load its weights strictly (eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustEdgeError(f"{path}: cannot read weights (truncated or corrupt?): {exc}") from None
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
