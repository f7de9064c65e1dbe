"""RobustBench's L-inf models as sources of :func:`robustedge.loading.load` (the ``zoo`` extra)."""

from __future__ import annotations

import torch
from torch import nn

from robustedge.errors import RobustEdgeError, first_line

ROBUSTBENCH_PREFIX = "robustbench:"


def load_robustbench(name: str, dataset: str | None, model_dir: str, device: torch.device | str = "cpu") -> nn.Module:
    """A RobustBench L-inf model by its leaderboard name, through ``robustbench.utils.load_model``.

    RobustBench models take [0, 1] pixels and normalise inside, as ours do, so they can be
    teachers as they are (they are not folded: their architectures are not all traceable).
    """
    try:
        from robustbench.utils import load_model as robustbench_load
    except ImportError:
        raise RobustEdgeError(f"'{ROBUSTBENCH_PREFIX}{name}' needs the RobustBench package: "
                              f"pip install 'robustedge[zoo]'") from None
    if dataset not in ("cifar10", "cifar100", "imagenet"):
        raise RobustEdgeError(f"RobustBench has no L-inf models for dataset '{dataset}' (cifar10, cifar100, imagenet)")
    try:
        model = robustbench_load(model_name=name, dataset=dataset, threat_model="Linf", model_dir=model_dir)
    except Exception as exc:  # robustbench raises KeyError/ValueError/HTTP errors for unknown names or no network
        raise RobustEdgeError(f"RobustBench could not load '{name}' ({dataset}, Linf): "
                              f"{first_line(exc)}") from None
    return model.to(device).eval()
