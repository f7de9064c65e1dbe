"""The Python API: one function per CLI command, with the CLI's names and defaults.

``robustedge.load`` / ``load_dataset`` / ``evaluate`` / ``export`` / ``verify`` / ``train`` / ``distill``
are what ``robustedge eval|export|verify|train|distill`` call, so a notebook and a shell give the same
numbers. Models come from any source :func:`robustedge.loading.load` takes, including a live
``nn.Module``; evaluation runs sharded when a process group is initialised (robustedge/sharding.py).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustedge.errors import RobustEdgeError
from robustedge.loading import ModelFacts
from robustedge.options import AUTOATTACK_BLOCK

def load(source, *, arch: str | None = None, num_classes: int | None = None, in_channels: int | None = None,
         image_size: int | None = None, width: float = 1.0, mean: list[float] | None = None,
         std: list[float] | None = None, dataset: str | None = None, eps: float | None = None,
         device: torch.device | str = "auto", facts: ModelFacts | None = None):
    """``(model, meta)`` from a RobustEdge checkpoint, a state dict file with ``arch``,
    ``"robustbench:<name>"`` or an ``nn.Module`` (like ``robustbench.utils.load_model``, plus metadata;
    a module is copied, never moved or switched to eval mode). ``device``: ``auto`` (CUDA when present,
    the CLI's default), ``cpu``, ``cuda`` or ``cuda:N``. ``facts`` (the CLI's flags as one object)
    replaces the keyword arguments."""
    facts = facts or ModelFacts(arch, num_classes, in_channels, image_size, width, mean, std, dataset, eps)
    from robustedge.loading import load as _load

    return _load(source, facts=facts, device=device)


def load_dataset(name: str, root: str | None = None, **kwargs):
    """A registry dataset (``digits`` is embedded; CIFAR-10/100 and SVHN read their standard files)."""
    from robustedge.data import load_dataset as _load_dataset

    return _load_dataset(name, root, **kwargs)


def _as_images(x, device) -> torch.Tensor:
    """[0, 1] float32 images on ``device`` from float tensors/arrays, or uint8 ones (divided by 255)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise RobustEdgeError("images must be a 4-d (N, C, H, W) tensor or array")
    x = x.to(device)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    x = x.float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise RobustEdgeError("float images must be finite and in [0, 1] (the models normalise inside)")
    return x


def evaluate(model, x=None, y=None, *, attacks: str | list[str] = "all", eps: float | None = None,
             n: int | None = None, split: str = "test", data_root: str | None = None, batch_size: int | str = 256,
             aa_batch_size: int | None = AUTOATTACK_BLOCK, seed: int = 0, fold_bn: bool = False, flags: Any = True,
             show_progress: bool = True, device: torch.device | str | None = None, distributed: bool = False,
             resume=None, on_update=None):
    """The robustness suite (``robustedge eval``); returns the :class:`~robustedge.evaluate.EvalReport`
    (``.accuracy``, ``.w_robust(attack)``, ``.worst``, ``.flags``, ``.correct`` per example, ``.to_text()``).

    ``model``: a model or any source :func:`load` takes. ``x``/``y``: images in [0, 1] (or uint8) and labels;
    when omitted, the first ``n`` examples of ``split`` of the model's dataset (default None: all of it, as
    ``robustedge eval``). ``eps``: the checkpoint's when
    it records one. ``flags``: True for the default attack-failure checks, a ``FlagSettings``, or False.
    ``device``: where to run (default: a module's own device; for a file or name ``auto``, CUDA when
    present); a module elsewhere is evaluated as a copy there, the caller's own is not moved.
    ``distributed=True`` under ``torchrun`` (an initialised process group): every rank calls this, the
    examples are sharded over the ranks and every rank returns the same report, identical to a
    one-process run with the same seed (`robustedge eval` does this under torchrun). Off by default: a
    rank evaluating alone inside its own DDP script must not wait for ranks that never come.
    ``on_update(report)``: called with the unfinished report after each attack and block (save it, e.g.
    ``report.save('eval.json')``); ``resume``: such a report (or the path of its ``eval.json``) to continue
    from its last finished attack and block, as ``robustedge eval --resume``."""
    from robustedge.evaluate import EvalReport, parse_attacks
    from robustedge.evaluate import evaluate as _evaluate
    from robustedge.flags import FlagSettings

    from robustedge.runtime import resolve_device

    attacks = parse_attacks(attacks)
    if device is not None:
        device = device if isinstance(device, torch.device) else resolve_device(str(device))
    else:
        device = _device_of(model) if isinstance(model, nn.Module) else resolve_device("auto")
    meta = None
    if not isinstance(model, nn.Module):
        model, meta = load(model, device=device)
    elif _device_of(model) != device:
        model = copy.deepcopy(model).to(device)  # the caller's module stays where it is
    if x is None:
        if meta is None:
            raise RobustEdgeError("pass images x and labels y with an nn.Module (or load it with robustedge.load)")
        from robustedge.data import split_for_model

        data = split_for_model(meta, None, data_root, split, n or None)
        x, y = data.float_images(device), data.labels.to(device)
    else:
        x = _as_images(x, device)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().to(device)
        if y.shape != (len(x),):
            raise RobustEdgeError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    if eps is None:
        eps = meta.eps if meta is not None else None
        if eps is None:
            raise RobustEdgeError("pass eps (the model records none)")
    settings = FlagSettings() if flags is True else (flags or None)
    if resume is not None and not isinstance(resume, EvalReport):
        from robustedge.files import read_json

        resume = EvalReport.from_dict(read_json(Path(resume)))
    return _evaluate(model, x, y, attacks=attacks, eps=eps, batch_size=batch_size, seed=seed,
                     aa_batch_size=aa_batch_size, show_progress=show_progress, fold_bn=fold_bn, flags=settings,
                     distributed=distributed, resume=resume, on_update=on_update)


def _device_of(model: nn.Module) -> torch.device:
    from robustedge.export.runners import model_device

    return model_device(model)


def export(model, out: str | os.PathLike, *, formats: str | list[str] = "onnx,onnx-fp16,onnx-int8",
           force: bool = False, progress=None, dataset: str | None = None, eps: float | None = None,
           arch: str | None = None, device: torch.device | str = "auto", **options):
    """``robustedge export``: build and verify a bundle at ``out``; returns ``(manifest, gate failures)``.

    ``model``: a checkpoint, a state dict file with ``arch``, ``robustbench:<name>`` or an ``nn.Module``
    (with ``dataset`` and ``eps`` where it does not say; a module is copied, not moved). ``device``: where
    the torch side runs (``auto``: CUDA when present). ``options``: the fields of
    :class:`~robustedge.export.bundle.ExportOptions` (``n``, ``calibration_n``, ``whitebox_attacks``, ...)."""
    from robustedge.export.bundle import ExportOptions, export_bundle

    try:
        opts = ExportOptions(formats=formats, **options)
    except TypeError as exc:
        raise RobustEdgeError(f"unknown export option: {exc}") from None
    facts = ModelFacts(arch=arch, dataset=dataset, eps=eps)
    return export_bundle(model, out, opts, progress=progress or (lambda m: None), force=force, facts=facts,
                         device=device)


def verify(bundle: str | os.PathLike, *, square_n: int | None = None, progress=None):
    """``robustedge verify``: re-check a bundle's files and numbers; returns ``(report, gate failures)``."""
    from robustedge.export.bundle import verify_bundle
    from robustedge.verify_core import Gate, load_manifest

    gate = Gate.from_dict(load_manifest(Path(bundle))["gate"])
    return verify_bundle(bundle, gate, square_n, progress=progress or (lambda m: None))


def train(config: str | os.PathLike | Any, *, resume: bool = False, **overrides):
    """``robustedge train``/``distill``: ``config`` is a recipe name, a YAML file or a ``TrainConfig``;
    ``overrides`` set fields by dotted name with ``__`` for the dot (``epochs=2``, ``optim__lr=0.01``),
    as ``--set optim.lr=0.01`` does. Returns the run's ``TrainResult``."""
    from robustedge.config import TrainConfig, apply_values, load_config, validate_config
    from robustedge.train import train as _train

    cfg = config if isinstance(config, TrainConfig) else load_config(str(config))
    cfg = apply_values(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    return _train(validate_config(cfg), resume=resume)


distill = train  # the same trainer: the method named in the config decides whether teachers are used
