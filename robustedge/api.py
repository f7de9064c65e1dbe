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
from robustedge.options import (AUTOATTACK_BLOCK, parse_batch_size, parse_eps, parse_fraction, parse_int,
                                parse_seed)


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

    if not isinstance(name, str):
        raise RobustEdgeError(f"dataset name must be a string, got {name!r}")
    root = None if root is None else str(_path_arg(root, "root"))
    checks = {"image_size": lambda v: parse_int(v, "image_size", 8), "channels": lambda v: parse_int(v, "channels", 1),
              "val_fraction": lambda v: parse_fraction(v, "val_fraction"), "seed": lambda v: parse_seed(v, "seed"),
              "download": lambda v: _bool_arg(v, "download")}
    unknown = sorted(set(kwargs) - set(checks))
    if unknown:
        raise RobustEdgeError(f"unknown load_dataset argument(s): {', '.join(unknown)}; valid: {', '.join(checks)}")
    kwargs = {k: v if v is None and k in ("image_size", "channels") else checks[k](v) for k, v in kwargs.items()}
    return _load_dataset(name, root, **kwargs)


def _as_images(x, device) -> torch.Tensor:
    """[0, 1] float32 images on ``device`` from float tensors/arrays, or uint8 ones (divided by 255)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise RobustEdgeError("images must be a 4-d (N, C, H, W) tensor or array")
    if len(x) == 0:
        raise RobustEdgeError("nothing to evaluate: no examples")
    x = x.to(device)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    x = x.float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise RobustEdgeError("float images must be finite and in [0, 1] (the models normalise inside)")
    return x


def evaluate(model, x=None, y=None, *, attacks: str | list[str] = "all", eps: float | None = None,
             n: int | None = None, split: str = "test", data_root: str | None = None, batch_size: int | str = "auto",
             aa_batch_size: int | None = AUTOATTACK_BLOCK, seed: int = 0, fold_bn: bool = False, flags: Any = True,
             show_progress: bool = True, device: torch.device | str | None = None, distributed: bool = False,
             resume=None, on_update=None):
    """The robustness suite (``robustedge eval``); returns the :class:`~robustedge.suite.EvalReport`
    (``.accuracy``, ``.w_robust(attack)``, ``.worst``, ``.flags``, ``.correct`` per example, ``.to_text()``).

    ``model``: a model or any source :func:`load` takes. ``x``/``y``: images in [0, 1] (or uint8) and labels;
    when omitted, the first ``n`` examples of ``split`` of the model's dataset (default None: all of it, as
    ``robustedge eval``). ``batch_size``: the attacks' batch, ``'auto'`` (as ``robustedge eval``) the largest
    that fits in memory; attacks are per-example, so it changes speed, not results. ``eps``: the checkpoint's when
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
    from robustedge.eval_report import EvalReport, parse_attacks, resumable_report
    from robustedge.suite import evaluate as _evaluate
    from robustedge.flags import FlagSettings
    from robustedge.runtime import resolve_device

    if not (isinstance(attacks, str) or isinstance(attacks, (list, tuple)) and all(isinstance(a, str) for a in attacks)):
        raise RobustEdgeError(f"attacks must be a comma-separated string or a list of attack names, got {attacks!r}")
    attacks = parse_attacks(attacks)
    eps = None if eps is None else parse_eps(eps, "eps")
    n = None if n is None else parse_int(n, "n", 0) or None  # 0: the whole split, as `robustedge eval --n 0`
    if split not in SPLITS:
        raise RobustEdgeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    data_root = None if data_root is None else str(_path_arg(data_root, "data_root"))
    batch_size = parse_batch_size(batch_size, "batch_size")
    aa_batch_size = None if aa_batch_size is None else parse_int(aa_batch_size, "aa_batch_size", 1)
    seed = parse_seed(seed, "seed")
    for name, value in (("fold_bn", fold_bn), ("show_progress", show_progress), ("distributed", distributed)):
        _bool_arg(value, name)
    if not (isinstance(flags, (bool, FlagSettings))):
        raise RobustEdgeError(f"flags must be True, False or a FlagSettings, got {flags!r}")
    if isinstance(flags, FlagSettings):
        flags.validate()
    if resume is not None and not isinstance(resume, (EvalReport, str, os.PathLike)):
        raise RobustEdgeError(f"resume must be an EvalReport or the path of an eval.json, got {resume!r}")
    if on_update is not None and not callable(on_update):
        raise RobustEdgeError(f"on_update must be a function of the report, got {on_update!r}")
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise RobustEdgeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
        device = resolve_device(str(device))
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
        y = _as_labels(y, len(x), device)
        if meta is not None and tuple(x.shape[1:]) != tuple(meta.spec.input_shape):
            raise RobustEdgeError(f"images must be {meta.spec.input_shape} (channels, height, width) for this "
                                  f"model, got {tuple(x.shape[1:])}")
    if eps is None:
        eps = meta.eps if meta is not None else None
        if eps is None:
            raise RobustEdgeError("pass eps (the model records none)")
    settings = FlagSettings() if flags is True else (flags or None)
    if resume is not None and not isinstance(resume, EvalReport):
        from robustedge.files import read_json

        path = _path_arg(resume, "resume")
        resume = resumable_report(read_json(path), str(path))
    return _evaluate(model, x, y, attacks=attacks, eps=eps, batch_size=batch_size, seed=seed,
                     aa_batch_size=aa_batch_size, show_progress=show_progress, fold_bn=fold_bn, flags=settings,
                     distributed=distributed, resume=resume, on_update=on_update)


SPLITS = ("train", "val", "test")


def _path_arg(value, name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise RobustEdgeError(f"{name} must be a path (a string or a Path), got {value!r}")
    return Path(value)


def _bool_arg(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise RobustEdgeError(f"{name} must be True or False, got {value!r}")
    return value


def _as_labels(y, n: int, device) -> torch.Tensor:
    """Integer class indices, one per image: float labels are refused, not truncated."""
    try:
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    except (TypeError, ValueError, RuntimeError):
        raise RobustEdgeError(f"labels must be integer class indices, got {type(y).__name__}") from None
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise RobustEdgeError(f"labels must be integer class indices, got {y.dtype} values")
    if tuple(y.shape) != (n,):
        raise RobustEdgeError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    if n and int(y.min()) < 0:
        raise RobustEdgeError(f"labels must be class indices >= 0, got {int(y.min())}")
    return y.long().to(device)


def _device_of(model: nn.Module) -> torch.device:
    from robustedge.runners import model_device

    return model_device(model)


def export(model, out: str | os.PathLike, *, formats: str | list[str] = "onnx,onnx-fp16,onnx-int8",
           force: bool = False, progress=None, dataset: str | None = None, eps: float | None = None,
           arch: str | None = None, device: torch.device | str = "auto", **options):
    """``robustedge export``: build and verify a bundle at ``out``; returns ``(manifest, gate failures)``.

    ``model``: a checkpoint, a state dict file with ``arch``, ``robustbench:<name>`` or an ``nn.Module``
    (with ``dataset`` and ``eps`` where it does not say; a module is copied, not moved). ``device``: where
    the torch side runs (``auto``: CUDA when present). ``options``: the fields of
    :class:`~robustedge.edge.bundle.ExportOptions` (``n``, ``calibration_n``, ``whitebox_attacks``, ...)."""
    from robustedge.edge.bundle import ExportOptions, export_bundle

    try:
        opts = ExportOptions(formats=formats, **options)
    except TypeError as exc:
        raise RobustEdgeError(f"unknown export option: {exc}") from None
    opts.validate()
    out = _path_arg(out, "out")
    _bool_arg(force, "force")
    if progress is not None and not callable(progress):
        raise RobustEdgeError(f"progress must be a function of one message, got {progress!r}")
    if not isinstance(device, (str, torch.device)):
        raise RobustEdgeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
    facts = ModelFacts(arch=arch, dataset=dataset, eps=eps).checked()
    return export_bundle(model, out, opts, progress=progress or (lambda m: None), force=force, facts=facts,
                         device=device)


def verify(bundle: str | os.PathLike, *, square_n: int | None = None, progress=None,
           out: str | os.PathLike | None = None, emulate: str | list[str] | None = None):
    """``robustedge verify``: re-check a bundle's files and numbers; returns ``(report, gate failures)`` and
    writes ``verify.json``/``verify.md`` to ``out`` (default ``<bundle>-verify`` beside it, never into it).
    ``emulate`` (``--emulate``): ``"arm64"`` also replays every file on arm64 builds of its runtimes under
    emulation; None: the processors the export replayed on; ``"none"``: none."""
    from robustedge.edge.reverify import verify_bundle
    from robustedge.verifier import Gate, load_manifest

    bundle = _path_arg(bundle, "bundle")
    if progress is not None and not callable(progress):
        raise RobustEdgeError(f"progress must be a function of one message, got {progress!r}")
    if square_n is not None:
        square_n = parse_int(square_n, "square_n", 0)
    if emulate is not None:
        from robustedge.edge.emulated_env import parse_isas

        emulate = parse_isas(emulate)
    gate = Gate.from_dict(load_manifest(bundle)["gate"])
    return verify_bundle(bundle, gate, square_n, progress=progress or (lambda m: None),
                         out=None if out is None else _path_arg(out, "out"), out_flag="out", emulate=emulate)


def train(config: str | os.PathLike | Any = None, *, resume: bool = False, qat_from: str | os.PathLike | None = None,
          **overrides):
    """``robustedge train``/``distill``: ``config`` is a recipe name, a YAML file or a ``TrainConfig``;
    ``overrides`` set fields by dotted name with ``__`` for the dot (``epochs=2``, ``optim__lr=0.01``),
    as ``--set optim.lr=0.01`` does. ``qat_from`` (``--qat-from``) fine-tunes that float student as its INT8
    function; without ``config``, from the float run's own config under the measured QAT recipe
    (robustedge/qat_recipe.py); with ``qat__float_control=True`` (``--qat-float-control``), the same
    fine-tune in float, the control. Returns the run's ``TrainResult``."""
    from robustedge.config import TrainConfig, apply_values, load_config, validate_config
    from robustedge.trainer import train as _train

    if config is None and qat_from is None:
        raise RobustEdgeError("train needs a config (a recipe name, a YAML file or a TrainConfig) or qat_from")
    if config is None:
        from robustedge.qat_recipe import float_control_config, recipe_config

        cfg = recipe_config(qat_from, overrides.get("epochs"))
        if overrides.get("qat__float_control") is True:
            cfg = float_control_config(cfg)
    else:
        cfg = copy.deepcopy(config) if isinstance(config, TrainConfig) else load_config(str(config))
        if qat_from is not None:
            enable = {} if overrides.get("qat__float_control") is True else {"qat__enabled": True}
            overrides = {**enable, "qat__from_checkpoint": str(qat_from), **overrides}
    cfg = apply_values(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    return _train(validate_config(cfg), resume=resume)


distill = train  # the same trainer: the method named in the config decides whether teachers are used


# --------------------------------------------------------------------------------------------
# A user's own model, dataset or method (docs/design/extending.md, "Your own model, dataset or method")
# --------------------------------------------------------------------------------------------

MODEL_KEYWORDS = ("num_classes", "in_channels", "width")
DATASET_KEYWORDS = ("root", "image_size", "channels", "val_fraction", "seed", "download")


def _takes_keywords(fn, keywords: tuple[str, ...]) -> bool:
    """Whether ``fn`` can be called with exactly these keyword arguments (True when Python cannot tell)."""
    import inspect

    try:
        inspect.signature(fn).bind(**{k: None for k in keywords})
    except TypeError:
        return False
    except ValueError:  # no signature to read (some built-ins)
        return True
    return True


def _callable_arg(kind: str, name, fn, what: str, keywords: tuple[str, ...]) -> None:
    if not callable(fn):
        raise RobustEdgeError(f"{kind} '{name}' needs a {what}, got {type(fn).__name__} {fn!r:.60}")
    if not _takes_keywords(fn, keywords):
        raise RobustEdgeError(f"the {what} of {kind} '{name}' must accept the keyword arguments "
                              f"{', '.join(keywords)} (add **kwargs for the ones it ignores)")


def register_model(name: str, builder=None, *, replace: bool = False):
    """Add a model to the registry under ``name``: ``builder(num_classes=, in_channels=, width=)`` returns
    a :class:`robustedge.models.Classifier` (a ``Classifier`` subclass itself is such a builder). From then
    on ``name`` works wherever a model name does: ``arch`` in configs and ``robustedge.load``, checkpoints
    (rebuilt by name: register it again in a new process before loading one). Without ``builder``, a
    decorator. A taken name (built-in, ``wideresnet-<depth>-<widen>`` pattern or earlier registration) is
    refused unless ``replace=True``."""
    from robustedge.models import MODELS

    _bool_arg(replace, "replace")
    if builder is None:
        return lambda fn: register_model(name, fn, replace=replace)
    _name_arg("model", name)
    _callable_arg("model", name, builder, "builder", MODEL_KEYWORDS)
    return MODELS.register(name, builder, replace=replace)


def register_dataset(name: str, loader=None, *, replace: bool = False):
    """Add a dataset under ``name``: ``loader(root=, image_size=, channels=, val_fraction=, seed=, download=)``
    returns a :class:`robustedge.data.Dataset` (uint8 (N, C, H, W) square images, int64 labels in
    ``[0, len(classes))``, train/val/test splits). The loader may ignore ``image_size``/``channels``
    (``None``: its own shape): what it returns is resized and channel-converted as the built-in datasets
    are. The returned data is checked on every load. Without ``loader``, a decorator; a taken name is
    refused unless ``replace=True``."""
    from robustedge.data import DATASETS

    _bool_arg(replace, "replace")
    if loader is None:
        return lambda fn: register_dataset(name, fn, replace=replace)
    _name_arg("dataset", name)
    _callable_arg("dataset", name, loader, "loader", DATASET_KEYWORDS)

    def read(root, image_size, channels, val_fraction, seed, download):  # the built-in readers' call
        data = loader(root=root, image_size=image_size, channels=channels, val_fraction=val_fraction, seed=seed,
                      download=download)
        return _checked_dataset(name, data, image_size, channels)

    DATASETS.register(name, read, replace=replace)
    return loader


def register_method(cls=None, *, replace: bool = False):
    """Add a training method: a subclass of :class:`robustedge.methods.base.Method` with a class attribute
    ``name`` (its config name) and ``step(student, x, y) -> (loss, logs)``; ``teacher_roles``,
    ``defaults`` (its ``method_args``), ``released_start``/``released_mode`` as the built-in methods set
    them. Usable as a class decorator; returns the class. A taken name is refused unless ``replace=True``."""
    from robustedge.methods import METHODS
    from robustedge.methods.base import Method

    _bool_arg(replace, "replace")
    if cls is None:
        return lambda c: register_method(c, replace=replace)
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls is Method:
        raise RobustEdgeError(f"a method is a subclass of robustedge.methods.base.Method, got {cls!r:.60}")
    name = cls.__dict__.get("name", "")
    if not name:
        raise RobustEdgeError(f"method class {cls.__name__} needs its own name (a class attribute, e.g. "
                              f"name = \"{cls.__name__.lower()}\")")
    _name_arg("method", name)
    if cls.step is Method.step:
        raise RobustEdgeError(f"method class {cls.__name__} must implement step(student, x, y) -> (loss, logs)")
    _method_attributes(cls)
    METHODS.names()  # discover the built-in methods first, so a clash is caught now, not on their import
    return METHODS.register(name, cls, replace=replace)


def _name_arg(kind: str, name) -> None:
    if not isinstance(name, str):
        raise RobustEdgeError(f"a {kind} name must be a string, got {name!r:.60}")


def _method_attributes(cls) -> None:
    from robustedge.config import ATTACK_MODES, STARTS

    c = cls.__name__
    if not (isinstance(cls.teacher_roles, tuple) and all(isinstance(r, str) and r for r in cls.teacher_roles)):
        raise RobustEdgeError(f"method class {c}: teacher_roles must be a tuple of role names, got {cls.teacher_roles!r}")
    if not (isinstance(cls.defaults, dict) and all(isinstance(k, str) for k in cls.defaults)):
        raise RobustEdgeError(f"method class {c}: defaults must be a dict of method_args, got {cls.defaults!r:.60}")
    starts, modes = [s for s in STARTS if s != "auto"], [m for m in ATTACK_MODES if m != "auto"]
    if cls.released_start not in starts:
        raise RobustEdgeError(f"method class {c}: released_start must be one of {', '.join(starts)}, "
                              f"got {cls.released_start!r}")
    if cls.released_mode not in modes:
        raise RobustEdgeError(f"method class {c}: released_mode must be one of {', '.join(modes)}, "
                              f"got {cls.released_mode!r}")
    if not isinstance(cls.adversarial, bool):
        raise RobustEdgeError(f"method class {c}: adversarial must be True or False, got {cls.adversarial!r}")


def _checked_dataset(name: str, data, image_size: int | None, channels: int | None):
    """A user loader's :class:`~robustedge.data.Dataset`, checked and brought to the asked shape."""
    from dataclasses import replace

    from robustedge.data import Dataset, Split
    from robustedge.data.readers import _convert

    where = f"dataset '{name}'"
    if not isinstance(data, Dataset):
        raise RobustEdgeError(f"{where}: the loader must return a robustedge.data.Dataset, got {type(data).__name__}")
    if not (isinstance(data.classes, list) and len(data.classes) >= 2):
        raise RobustEdgeError(f"{where}: classes must be a list of at least two class names")
    shape = None
    splits = {}
    for part in ("train", "val", "test"):
        split = getattr(data, part)
        if not isinstance(split, Split):
            raise RobustEdgeError(f"{where}: {part} must be a robustedge.data.Split, got {type(split).__name__}")
        x, y = split.images, split.labels
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[-1] == x.shape[-2]):
            raise RobustEdgeError(f"{where}: {part} images must be a uint8 tensor (N, C, H, W) with H == W, got "
                                  f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if shape is not None and tuple(x.shape[1:]) != shape:
            raise RobustEdgeError(f"{where}: {part} images are {tuple(x.shape[1:])}, train images {shape}")
        shape = tuple(x.shape[1:])
        if not (isinstance(y, torch.Tensor) and y.dtype == torch.int64 and tuple(y.shape) == (len(x),)):
            raise RobustEdgeError(f"{where}: {part} labels must be an int64 tensor of shape ({len(x)},), got "
                                  f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(data.classes)):
            raise RobustEdgeError(f"{where}: {part} labels must be in [0, {len(data.classes)}), got "
                                  f"{int(y.min())}..{int(y.max())}")
        splits[part] = Split(_convert(x, image_size, channels), y)
    if len(data.train) == 0:
        raise RobustEdgeError(f"{where}: the train split is empty")
    return replace(data, **splits)
