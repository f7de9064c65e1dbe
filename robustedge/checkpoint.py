"""Model files: safetensors weights with their JSON metadata in the same file.

One ``.safetensors`` file is a complete, self-describing model: the header's ``robustedge`` entry
holds the architecture spec (name, classes, channels, width, normalisation, input size) and the
run's facts (dataset, eps, method, metrics, library version). safetensors cannot execute code on
load, which is the point. Foreign weights (``.pt``/``.pth``) are :mod:`robustedge.weights`' job,
teachers :mod:`robustedge.teachers`', resumable training states :mod:`robustedge.training_state`'.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from robustedge._version import __version__
from robustedge.errors import RobustEdgeError
from robustedge.files import save_safetensors
from robustedge.models import Classifier, build_model

FORMAT = "robustedge/1"
TRAINING_KIND = "training-state"  # header "kind" of a run's last.safetensors (robustedge.training_state)


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
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False,
                          default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

    @classmethod
    def from_json(cls, text: str) -> "ModelMeta":
        raw = json.loads(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
            raise ValueError("metadata must be an object with a 'spec' object")
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}  # files from newer versions may say more
        raw["spec"] = ModelSpec(**raw["spec"])
        meta = cls(**raw)
        meta.check()
        return meta

    def check(self) -> None:
        """Types and ranges of every field (a file's metadata is input like any other)."""
        s = self.spec
        counts = (s.num_classes, s.in_channels, s.image_size)
        if not (isinstance(s.arch, str) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                                for c in counts) and _finite(s.width) and s.width > 0):
            raise ValueError("spec needs arch (string), num_classes/in_channels/image_size (integers >= 1), width > 0")
        for stats in (s.mean, s.std):
            if stats is not None and not (isinstance(stats, list) and stats and all(_finite(v) for v in stats)):
                raise ValueError("spec mean/std must be lists of numbers")
        if (s.mean is None) != (s.std is None) or s.mean is not None and (
                len(s.mean) != len(s.std) or len(s.mean) not in (1, s.in_channels) or min(s.std) <= 0):
            raise ValueError(f"spec mean/std must come together, one value per input channel ({s.in_channels}), "
                             f"std > 0; got mean {s.mean}, std {s.std}")
        if self.eps is not None and not (_finite(self.eps) and 0 <= self.eps <= 1):
            raise ValueError(f"eps must be a number in [0, 1], got {self.eps!r}")
        if not isinstance(self.dataset, str) or not (self.method is None or isinstance(self.method, str)):
            raise ValueError("dataset and method must be strings")
        if self.classes is not None and not (isinstance(self.classes, list) and
                                             all(isinstance(c, str) for c in self.classes)):
            raise ValueError("classes must be a list of strings")
        if not isinstance(self.metrics, dict) or not isinstance(self.extra, dict) or \
                not isinstance(self.extra.get("data", {}), dict):
            raise ValueError("metrics and extra (and extra.data) must be objects")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def save_model(path: str | os.PathLike, model: nn.Module, meta: ModelMeta, exclusive: bool = False) -> Path:
    """Write weights + metadata to one safetensors file, atomically (:func:`robustedge.files.save_safetensors`).

    ``exclusive``: never replace a file at ``path``, even one another process created while this one
    was written (``robustedge import``: two imports to the same ``--out`` both pass its exists-check);
    then the existing file is left byte-identical and the refusal is one line.
    """
    model = unwrap(model)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    try:
        save_safetensors(path, tensors, {"format": FORMAT, "robustedge": meta.to_json()}, exclusive=exclusive)
    except FileExistsError:
        raise RobustEdgeError(f"{path} exists; choose another --out (import never overwrites)") from None
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


def check_file(path: Path, what: str = "checkpoint") -> None:
    if not path.exists():
        raise RobustEdgeError(f"{what} not found: {path}")
    if not path.is_file():
        raise RobustEdgeError(f"{what} is not a file: {path}")


def _read_header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    check_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def _meta_from_header(path: Path, header: dict[str, str]) -> ModelMeta:
    if header.get("format") != FORMAT or "robustedge" not in header:
        raise RobustEdgeError(f"{path} is a safetensors file but not a RobustEdge model (no model metadata); "
                              f"load foreign weights with an explicit architecture instead")
    try:
        return ModelMeta.from_json(header["robustedge"])
    except (ValueError, TypeError, KeyError) as exc:
        raise RobustEdgeError(f"{path}: malformed RobustEdge metadata ({exc})") from None


def is_robustedge_file(path: str | os.PathLike) -> bool:
    """Whether a readable safetensors file carries RobustEdge metadata (an unreadable one raises)."""
    header = _read_header(Path(path))
    return header.get("format") == FORMAT and "robustedge" in header


def weights_file_bytes(path: str | os.PathLike) -> int:
    """The size of the weights file a model ships as: the file itself, or for a run's training state
    (``last.safetensors``, which also holds the optimizer's buffers: about twice the model) the weights
    file :func:`save_model` would write from it. Export tables quote it beside the INT8 files."""
    path = Path(path)
    header = _read_header(path)
    if header.get("kind") != TRAINING_KIND:
        return path.stat().st_size
    from safetensors.torch import save

    _, _, tensors = read_robustedge_file(path)
    return len(save(model_part(tensors), {"format": FORMAT, "robustedge": header["robustedge"]}))


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """The metadata of a RobustEdge model file, without loading its weights."""
    path = Path(path)
    return _meta_from_header(path, _read_header(path))


def trained_method(path: str | os.PathLike) -> str | None:
    """The method the run that wrote ``path`` trained with (the config its metadata records), or None."""
    config = read_meta(path).extra.get("config")
    return config.get("method") if isinstance(config, dict) else None


def read_robustedge_file(path: Path) -> tuple[dict[str, str], ModelMeta, dict[str, torch.Tensor]]:
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


def model_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights of a training state (stored under a ``model.`` prefix)."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
