"""What the report shows but no run wrote: a run's accuracy against eps and its torch latency, measured
here and cached beside the run (``eps_curve.json``), so that robustedge/report.py only reads and renders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from robustedge.files import atomic_write_json
from robustedge.verifier import is_number

EPS_FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # the curve's eps, as multiples of the run's eps


def torch_latency_ms(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Batch-1 latency of the folded model in torch eager (the export table's ``torch`` row's way)."""
    from robustedge.runners import TorchRunner
    from robustedge.models import fold_if_possible
    from robustedge.verifier import median_latency_ms

    return median_latency_ms(TorchRunner(fold_if_possible(model)), np.random.default_rng(0).random((1, *shape),
                                                                                               dtype=np.float32), 1,
                             repeats=20, warmup=3)


def _valid_curve(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("n"), int) and isinstance(data.get("eps"), list) \
        and isinstance(data.get("accuracy"), list) and len(data["eps"]) == len(data["accuracy"]) \
        and all(is_number(v) for v in data["eps"] + data["accuracy"])


def eps_curve(run: Path, model: torch.nn.Module, meta, n: int, data_root: str | None = None,
              warnings=None, device: torch.device | str = "cpu") -> dict | None:
    """PGD-20 accuracy at EPS_FACTORS x the run's eps on the first n test examples (cached), computed
    on ``device`` (a copy of the model goes there).

    A cache file that is not a curve is left alone (it may not be ours) and the curve is skipped, through
    ``warnings.skip(path, why)`` (the report's list of skipped files)."""
    cache = run / "eps_curve.json"
    if cache.exists():
        try:
            cached = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if warnings is not None:
                warnings.skip(cache, f"not readable JSON ({type(exc).__name__})")
            return None
        if not _valid_curve(cached):
            if warnings is not None:
                warnings.skip(cache, "not an eps curve; remove it to have it recomputed")
            return None
        if cached["n"] == n:
            return cached
    if not meta.eps:
        return None
    from robustedge.data import split_for_model
    from robustedge.suite import evaluate
    from robustedge.models import fold_if_possible

    split = split_for_model(meta, None, data_root, "test", n)
    x, y = split.float_images(device), split.labels.to(device)
    folded = fold_if_possible(copy.deepcopy(model).to(device))  # once for the whole curve
    eps_values = [round(f * meta.eps, 6) for f in EPS_FACTORS]
    accuracy = []
    for eps in eps_values:
        attack = "clean" if eps == 0 else "pgd20"
        report = evaluate(folded, x, y, attacks=[attack], eps=eps, batch_size=256, show_progress=False)
        accuracy.append(report.accuracy[attack])
    curve = {"n": len(y), "attack": "pgd20", "eps": eps_values, "accuracy": accuracy}
    atomic_write_json(cache, curve)
    return curve
