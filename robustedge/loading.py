"""Any model in: one loader for ``eval``, ``export``, ``app``, ``import`` and the Python API.

A source is a RobustEdge checkpoint (self-describing); a ``.pt``/``.pth``/``.safetensors`` state dict with
an ``arch`` from the registry (read weights-only, see :mod:`robustedge.weights`); ``robustbench:<name>``
(the ``zoo`` extra; weights cached under ``ROBUSTEDGE_CACHE`` or ``~/.cache/robustedge``); or, from
Python, any ``nn.Module`` that maps [0, 1] images to logits. What a foreign file does not say (classes,
channels, input size, normalisation, dataset, eps) comes from the keyword arguments, then from the
dataset's standard shape (:data:`DATASET_DEFAULTS`). Every source comes back as ``(model, meta)`` in
eval mode, so the rest of RobustEdge never asks where a model came from.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robustedge.checkpoint import ModelMeta, ModelSpec, check_file, is_robustedge_file
from robustedge.weights import load_model
from robustedge.errors import RobustEdgeError, first_line
from robustedge.options import parse_eps, parse_int, parse_number, parse_positive
from robustedge.robustbench_zoo import ROBUSTBENCH_PREFIX

# (classes, channels, image size, the field's L-inf eps) of each registry dataset's standard setting
DATASET_DEFAULTS = {
    "cifar10": (10, 3, 32, 8 / 255),
    "cifar100": (100, 3, 32, 8 / 255),
    "svhn": (10, 3, 32, 8 / 255),
    "digits": (10, 1, 16, 0.1),
}


# The rule for each numeric fact, shared by the CLI's flags (``--image-size``) and the API's keywords
# (``image_size``): one check, the same message but for the spelling of the name.
FACT_RULES = {
    "num_classes": (parse_int, (2,)),
    "in_channels": (parse_int, (1,)),
    "image_size": (parse_int, (8,)),
    "width": (parse_positive, ()),
    "eps": (parse_eps, ()),
}


def fact_name(field: str, cli: bool) -> str:
    return "--" + field.replace("_", "-") if cli else field


def check_fact(field: str, value, cli: bool = False):
    parse, args = FACT_RULES[field]
    return parse(value, fact_name(field, cli), *args)


def check_normalisation(mean, std, channels: int | None, cli: bool = False) -> None:
    """Per-channel mean and std: given together, finite, std > 0, one value per input channel (or one for all)."""
    m, s = fact_name("mean", cli), fact_name("std", cli)
    if (mean is None) != (std is None):
        raise RobustEdgeError(f"{m} and {s} must be given together")
    if mean is None:
        return
    for name, values in ((m, mean), (s, std)):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
            raise RobustEdgeError(f"{name} must be a list of numbers, got {values!r}")
        for v in values:
            parse_number(v, name)
    if any(float(v) <= 0 for v in std):
        raise RobustEdgeError(f"{s} must be > 0 for every channel (inputs are divided by it), got {list(std)}")
    if len(mean) != len(std):
        raise RobustEdgeError(f"{m} has {len(mean)} values and {s} {len(std)}; give one per input channel")
    if channels is not None and len(mean) not in (1, channels):
        raise RobustEdgeError(f"{m}/{s} have {len(mean)} values but the model takes {channels} input channel"
                              f"{'s' if channels != 1 else ''}; give one per channel")


@dataclass
class ModelFacts:
    """What a foreign source does not record; ``None`` falls back to the dataset's standard setting."""
    arch: str | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    width: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    dataset: str | None = None
    eps: float | None = None
    cli: bool = False  # name the facts as the CLI's flags (--image-size) in messages, else as keywords

    def checked(self, cli: bool | None = None) -> "ModelFacts":
        """The facts with every value checked (a bad one is a one-line error naming it, as the CLI's flags)."""
        cli = self.cli if cli is None else cli
        values = {f: None if getattr(self, f) is None else check_fact(f, getattr(self, f), cli) for f in FACT_RULES}
        for field in ("arch", "dataset"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, str):
                raise RobustEdgeError(f"{fact_name(field, cli)} must be a name (a string), got {value!r}")
        check_normalisation(self.mean, self.std, values["in_channels"], cli)
        mean = None if self.mean is None else [float(v) for v in self.mean]
        std = None if self.std is None else [float(v) for v in self.std]
        return ModelFacts(self.arch, values["num_classes"], values["in_channels"], values["image_size"],
                          1.0 if values["width"] is None else values["width"], mean, std, self.dataset, values["eps"],
                          cli)

    def resolved(self, what: str) -> tuple[str, int, int, int, float | None]:
        """(dataset, classes, channels, image size, eps), refusing what neither the caller nor the dataset says."""
        dataset = self.dataset or "cifar10"
        classes, channels, size, eps = DATASET_DEFAULTS.get(dataset, (None, None, None, None))
        classes, channels = self.num_classes or classes, self.in_channels or channels
        size, eps = self.image_size or size, self.eps if self.eps is not None else eps
        if classes is None or channels is None or size is None:
            raise RobustEdgeError(f"{what}: dataset '{dataset}' has no standard shape; pass --num-classes, "
                                  f"--in-channels and --image-size")
        check_normalisation(self.mean, self.std, int(channels), self.cli)
        return dataset, int(classes), int(channels), int(size), eps


def cache_dir() -> Path:
    return Path(os.environ.get("ROBUSTEDGE_CACHE") or Path.home() / ".cache" / "robustedge")


def load(source: str | os.PathLike | nn.Module, *, facts: ModelFacts | None = None,
         device: torch.device | str = "auto") -> tuple[nn.Module, ModelMeta]:
    """``(model, meta)`` from any supported source (see the module docstring), in eval mode on ``device``
    (``auto``: CUDA when present, as the CLI). A live ``nn.Module`` is copied: the caller's own module
    keeps its device and its train/eval mode."""
    from robustedge.runtime import resolve_device

    if facts is not None and not isinstance(facts, ModelFacts):
        raise RobustEdgeError(f"facts must be a ModelFacts, got {type(facts).__name__}")
    facts = (facts or ModelFacts()).checked()
    if not isinstance(device, (str, torch.device)):
        raise RobustEdgeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
    device = resolve_device(str(device))  # a torch.device too: CUDA asked for where there is none is one line
    if isinstance(source, nn.Module):
        return _from_module(source, facts, device)
    if not isinstance(source, (str, os.PathLike)):
        raise RobustEdgeError(f"a model source is a file, 'robustbench:<name>' or an nn.Module, got {type(source).__name__}")
    text = str(source)
    if text.startswith(ROBUSTBENCH_PREFIX):
        return _from_robustbench(text[len(ROBUSTBENCH_PREFIX):], facts, device)
    path = Path(text)
    check_file(path)
    if path.suffix == ".safetensors" and is_robustedge_file(path):  # a corrupt file fails here, in one line
        model, meta = load_model(path, device)
        if facts.eps is not None:
            meta.eps = facts.eps
        return model, meta
    if facts.arch is None:
        from robustedge.models import model_names

        what = ("is a safetensors file but not a RobustEdge model (no model metadata)" if path.suffix == ".safetensors"
                else "is not a RobustEdge checkpoint")
        raise RobustEdgeError(f"{path} {what}: pass --arch ({', '.join(model_names())}) to load it as a state dict")
    return _from_state_dict(path, facts, device)


def _meta(spec: ModelSpec, dataset: str, eps: float | None, source: dict) -> ModelMeta:
    from robustedge.data import DATASETS

    meta = ModelMeta(spec, dataset=dataset if dataset in DATASETS else "unknown", eps=eps, extra={"source": source})
    try:
        meta.check()
    except ValueError as exc:
        raise RobustEdgeError(str(exc)) from None
    return meta


def _from_state_dict(path: Path, facts: ModelFacts, device) -> tuple[nn.Module, ModelMeta]:
    from robustedge.models import check_arch
    from robustedge.verifier import sha256
    from robustedge.weights import load_weights

    dataset, classes, channels, size, eps = facts.resolved(str(path))
    spec = ModelSpec(check_arch(facts.arch), classes, channels, facts.width, size, facts.mean, facts.std)
    model = load_weights(spec, path, device)
    return model, _meta(spec, dataset, eps, {"kind": "state dict", "file": path.name, "sha256": sha256(path)})


def _from_robustbench(name: str, facts: ModelFacts, device) -> tuple[nn.Module, ModelMeta]:
    from robustedge.robustbench_zoo import load_robustbench

    dataset, classes, channels, size, eps = facts.resolved(ROBUSTBENCH_PREFIX + name)
    model = load_robustbench(name, dataset, str(cache_dir() / "robustbench"), device)
    return _checked_module(model, ModelSpec(ROBUSTBENCH_PREFIX + name, classes, channels, 1.0, size),
                           dataset, eps, {"kind": "robustbench", "name": name}, device)


def _from_module(model: nn.Module, facts: ModelFacts, device) -> tuple[nn.Module, ModelMeta]:
    dataset, classes, channels, size, eps = facts.resolved(type(model).__name__)
    spec = ModelSpec(f"module:{type(model).__name__}", classes, channels, 1.0, size)
    return _checked_module(copy.deepcopy(model).to(device), spec, dataset, eps, {"kind": "nn.Module"}, device)


def _checked_module(model: nn.Module, spec: ModelSpec, dataset: str, eps, source: dict,
                    device) -> tuple[nn.Module, ModelMeta]:
    """A module of unknown architecture, checked to map one (C, H, W) image to ``num_classes`` logits (on
    a zero image: loading must not move the global random stream a training run depends on)."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *spec.input_shape, device=device))
    except Exception as exc:  # an arbitrary module raises anything on a wrong input shape
        raise RobustEdgeError(f"the model does not take {spec.input_shape} images: "
                              f"{first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        predicts = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else "no"
        raise RobustEdgeError(f"{spec.arch} predicts {predicts} classes; the data has {spec.num_classes} "
                              f"(expected logits of shape (1, {spec.num_classes}), got {shape})")
    return model, _meta(spec, dataset, eps, source)
