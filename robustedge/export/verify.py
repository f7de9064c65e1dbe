"""Re-verify robustness on exported artifacts, through their own runtimes (the torch side).

The replay of clean and adversarial samples, the table and the gate are the torch-free
:mod:`robustedge.verify_core`'s, shared with the bundle's own ``verify.py``. This module adds what
needs torch: crafting the adversarial samples on the torch model, the torch reference row, and the
black-box check (pyautoattack's Square attack querying the runtime itself). The ``torch`` row is the
reference: on its own adversarial examples its accuracy is the white-box robust accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustedge.errors import RobustEdgeError
from robustedge.export.runners import RunnerModule, TorchRunner
from robustedge.verify_core import artifact_row, check_finite, median_latency_ms, replay_row

TRANSFER_ATTACKS = ("pgd20", "autoattack")
CRAFTABLE = ("pgd20", "autoattack", "fgsm", "cw", "pgd20_trades")


def check_transfer_attacks(attacks: tuple[str, ...]) -> tuple[str, ...]:
    for name in attacks:
        if name not in CRAFTABLE:
            raise RobustEdgeError(f"unknown transfer attack '{name}'; valid: {', '.join(CRAFTABLE)}")
    return tuple(dict.fromkeys(attacks))


def craft_samples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  attacks: tuple[str, ...] = TRANSFER_ATTACKS, seed: int = 0,
                  precomputed: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Clean inputs, labels, torch predictions and adversarial examples crafted on the torch model."""
    from robustedge.attacks import autoattack
    from robustedge.evaluate import SUITE

    check_transfer_attacks(attacks)
    model = model.eval()
    samples = {"x": x.cpu().numpy().astype(np.float32), "y": y.cpu().numpy().astype(np.int64)}
    with torch.no_grad():
        logits = torch.cat([model(xb) for xb in x.split(256)])
    samples["torch_pred"] = check_finite(logits.float().cpu().numpy(), "the torch model").argmax(1).astype(np.int64)
    for name in attacks:
        if precomputed and name in precomputed:
            adv = precomputed[name]
        elif name == "autoattack":
            adv, _ = autoattack(model, x, y, eps=eps, seed=seed, batch_size=256)
        else:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            adv = torch.cat([SUITE[name].run(model, xb, yb, eps, gen) for xb, yb in zip(x.split(256), y.split(256))])
        samples[f"adv_{name}"] = adv.detach().cpu().numpy().astype(np.float32)
    return samples


def torch_row(model: torch.nn.Module, samples: dict[str, np.ndarray], size_bytes: int) -> dict:
    run = TorchRunner(model)
    row = replay_row(run, samples, what="the torch model")
    row.update(size_mb=size_bytes / 2**20, latency_b1_ms=median_latency_ms(run, samples["x"], 1),
               latency_b64_ms=median_latency_ms(run, samples["x"], 64))
    return row


def verify_artifact(path: Path, fmt: str, samples: dict[str, np.ndarray], eps: float, square_n: int = 100,
                    square_queries: int = 5000, seed: int = 0) -> dict:
    """The core's row for one artifact plus the black-box Square accuracy on its runtime."""
    row, runner = artifact_row(path, fmt, samples)
    if square_n > 0:
        row["square"] = square_accuracy(runner, samples, eps, square_n, square_queries, seed, what=fmt)
    return row


def square_accuracy(run, samples: dict[str, np.ndarray], eps: float, n: int, queries: int, seed: int,
                    what: str = "the model") -> float:
    """Black-box robust accuracy: pyautoattack's Square attack querying ``run`` (no gradients)."""
    from robustedge.attacks import autoattack

    x = torch.from_numpy(samples["x"][:n])
    y = torch.from_numpy(samples["y"][:n])
    _, y_adv = autoattack(RunnerModule(run, what), x, y, eps=eps, version="custom", attacks=["square"], seed=seed,
                          batch_size=max(1, n), device="cpu", square_queries=queries)
    return float((y_adv == y).float().mean())


def square_for_torch(model: torch.nn.Module, samples: dict[str, np.ndarray], eps: float, n: int, queries: int,
                     seed: int) -> float:
    return square_accuracy(TorchRunner(model), samples, eps, n, queries, seed, what="the torch model")
