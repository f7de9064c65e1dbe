"""Weights from elsewhere: ``.pt``/``.pth``/``.safetensors`` state dicts loaded into a registry model.

Published checkpoints (TRADES' WideResNet, kuangliu's ResNet-18, chenyaofo's ResNet-56, ...) are
pickles; they are read with ``torch.load(weights_only=True)`` only, which refuses anything but
tensors and plain containers, so a malicious file cannot run code. Loading is always strict, with
an error that names the keys and shapes that differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from robustedge.checkpoint import TRAINING_KIND, ModelMeta, ModelSpec, check_file, model_part, read_robustedge_file
from robustedge.errors import RobustEdgeError, first_line
from robustedge.models import Classifier


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``.pt``/``.pth`` file, never unpickling code.

    Unwraps the usual containers (``{'state_dict': ...}``, ``{'model': ...}``) and the
    ``module.`` prefix DataParallel leaves behind.
    """
    path = Path(path)
    check_file(path)
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
        raise RobustEdgeError(f"{path}: not a weights-only torch checkpoint ({first_line(exc)})") from None
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
    if hasattr(model, "match_quantizer_shapes"):  # a QAT student (robustedge/qat.py)
        model.match_quantizer_shapes(state)
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
    check_weight_values(state, expected, source)
    model.load_state_dict(state, strict=True)


# a QAT student's observers start at min_val = +inf, max_val = -inf (no batch seen yet): not weights
_OBSERVER_STATISTICS = (".min_val", ".max_val")


def check_weight_values(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str) -> None:
    """The model's input contract on the weights themselves: a float weight must come as floats (integers
    cast to float are another model, silently evaluated) and every float value must be finite (NaN/Inf
    weights give NaN logits or, worse, plausible-looking numbers from the finite part of the network)."""
    kinds = [f"{k} ({state[k].dtype} in file, {v.dtype} in model)" for k, v in expected.items()
             if state[k].is_floating_point() != v.is_floating_point() or state[k].is_complex()]
    if kinds:
        raise RobustEdgeError(f"{source}: weights of the wrong kind: {_preview(kinds, 3)}; the model needs "
                              f"floating-point weights where it has them")
    bad = [k for k, v in state.items() if v.is_floating_point() and not k.endswith(_OBSERVER_STATISTICS)
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise RobustEdgeError(f"{source}: non-finite (NaN/Inf) weights in {_preview(bad)}; refusing to use them")


def load_weights(spec: ModelSpec, path: str | os.PathLike, device: torch.device | str = "cpu") -> Classifier:
    """Build ``spec`` and load weights from any supported file into it, strictly."""
    model = spec.build()
    load_state_strict(model, read_state_dict(path), source=str(path), arch=spec.arch)
    return model.to(device).eval()


#


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model a RobustEdge file describes and load its weights strictly (eval mode).

    A run's ``last.safetensors`` (a training state) works too: its model part is used. A QAT student
    comes back as its fake-quantised :class:`robustedge.qat.QATStudent`.
    """
    path = Path(path)
    header, meta, state = read_robustedge_file(path)
    if header.get("kind") == TRAINING_KIND:
        state = model_part(state)
    try:
        model = meta.spec.build()
    except TypeError as exc:  # a spec with values of the wrong type
        raise RobustEdgeError(f"{path}: malformed model spec ({exc})") from None
    qat = meta.extra.get("qat")
    if qat:  # a QAT student: the same fake-quantised graph, rebuilt, then its weights and learned ranges
        from robustedge.qat import prepare_qat, saved_scheme

        model = prepare_qat(model, meta.spec.input_shape, *saved_scheme(qat, str(path)))
    load_state_strict(model, state, source=str(path), arch=meta.spec.arch)
    return model.to(device).eval(), meta
