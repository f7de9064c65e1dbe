"""Resumable training state: one safetensors file, the model's tensors plus a JSON tree of the rest.

Optimiser, scaler and method state (B-MTARD's temperatures, weights and first losses), the history
and the config are stored next to the weights (prefixed ``model.``), so the file is also a valid
model file. Nested structures are flattened: tensors go to the safetensors payload and the tree keeps
references to them; nothing is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robustedge.checkpoint import (FORMAT, TRAINING_KIND, ModelMeta, model_part, read_robustedge_file, unwrap)
from robustedge.errors import RobustEdgeError
from robustedge.files import save_safetensors


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


def save_training_state(path: str | os.PathLike, model: nn.Module, meta: ModelMeta, state: dict) -> Path:
    """Model weights (prefixed ``model.``) plus optimiser/scheduler/method/... state, atomically.

    The file is also a valid model file: :func:`load_model` reads its ``model.`` part.
    """
    model = unwrap(model)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tree = _flatten(state, "state", tensors)
    header = {"format": FORMAT, "robustedge": meta.to_json(), "kind": TRAINING_KIND,
              "training": json.dumps(tree, allow_nan=False)}
    return save_safetensors(path, tensors, header)


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelMeta, dict]:
    """(model weights, metadata, the rest of the state) of a run's ``last.safetensors``."""
    path = Path(path)
    header, meta, tensors = read_robustedge_file(path)
    if header.get("kind") != TRAINING_KIND:
        raise RobustEdgeError(f"{path} is a model file, not a training state; resume needs a run's last.safetensors")
    try:
        state = _unflatten(json.loads(header["training"]), tensors)
    except (KeyError, ValueError, TypeError) as exc:
        raise RobustEdgeError(f"{path}: malformed training state ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise RobustEdgeError(f"{path}: malformed training state (not a mapping)")
    return model_part(tensors), meta, state
