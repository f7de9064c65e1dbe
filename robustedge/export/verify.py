"""Re-verify robustness on exported artifacts, through their own runtimes.

For every artifact: clean accuracy; top-1 agreement with torch; transfer robust accuracy on
adversarial examples crafted on the torch model (PGD-20, AutoAttack); black-box robust accuracy by
pyautoattack's Square attack querying the runtime itself; size on disk; median latency at batch 1
and 64. The ``torch`` row is the reference: on its own adversarial examples its accuracy is the
white-box robust accuracy. The gate turns a regression into a non-zero exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustedge.errors import RobustEdgeError
from robustedge.export.runners import RunnerModule, TorchRunner, median_latency_ms, open_runner, predict

TRANSFER_ATTACKS = ("pgd20", "autoattack")


@dataclass
class Gate:
    max_robust_drop: float = 0.05  # accuracy points (fraction) an artifact may lose vs torch, clean or robust
    min_agreement: float = 0.95  # top-1 agreement with torch on clean inputs

    def check(self, table: dict[str, dict]) -> list[str]:
        ref = table["torch"]
        failures = []
        for fmt, row in table.items():
            if fmt == "torch":
                continue
            if row["agreement"] < self.min_agreement:
                failures.append(f"{fmt}: agreement {100 * row['agreement']:.1f}% < {100 * self.min_agreement:.1f}%")
            for key in [k for k in row if k == "clean" or k.startswith("transfer_")]:
                drop = ref[key] - row[key]
                if drop > self.max_robust_drop + 1e-9:
                    failures.append(f"{fmt}: {key} drops {100 * drop:.1f} points (> {100 * self.max_robust_drop:.1f})")
        return failures


def craft_samples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  attacks: tuple[str, ...] = TRANSFER_ATTACKS, seed: int = 0,
                  precomputed: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Clean inputs, labels, torch predictions and adversarial examples crafted on the torch model."""
    from robustedge.evaluate import SUITE
    from robustedge.attacks import autoattack

    model = model.eval()
    samples = {"x": x.cpu().numpy().astype(np.float32), "y": y.cpu().numpy().astype(np.int64)}
    with torch.no_grad():
        samples["torch_pred"] = model(x).argmax(1).cpu().numpy()
    for name in attacks:
        if precomputed and name in precomputed:
            adv = precomputed[name]
        elif name == "autoattack":
            adv, _ = autoattack(model, x, y, eps=eps, seed=seed, batch_size=256)
        elif name in SUITE and SUITE[name].run is not None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            adv = torch.cat([SUITE[name].run(model, xb, yb, eps, gen) for xb, yb in zip(x.split(256), y.split(256))])
        else:
            raise RobustEdgeError(f"unknown transfer attack '{name}'; valid: {', '.join(TRANSFER_ATTACKS)}, fgsm, cw")
        samples[f"adv_{name}"] = adv.detach().cpu().numpy().astype(np.float32)
    return samples


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else float("nan")


def torch_row(model: torch.nn.Module, samples: dict[str, np.ndarray], size_bytes: int) -> dict:
    run = TorchRunner(model)
    row = _common_row(run, samples)
    row.update(size_mb=size_bytes / 2**20, latency_b1_ms=median_latency_ms(run, samples["x"], 1),
               latency_b64_ms=median_latency_ms(run, samples["x"], 64))
    return row


def _common_row(run, samples: dict[str, np.ndarray]) -> dict:
    pred = predict(run, samples["x"]).argmax(1)
    row = {"clean": float((pred == samples["y"]).mean()), "agreement": float((pred == samples["torch_pred"]).mean())}
    for key in sorted(k for k in samples if k.startswith("adv_")):
        row[f"transfer_{key[4:]}"] = _accuracy(predict(run, samples[key]), samples["y"])
    return row


def verify_artifact(path: Path, fmt: str, samples: dict[str, np.ndarray], eps: float, square_n: int = 100,
                    square_queries: int = 5000, seed: int = 0) -> dict:
    runner = open_runner(path, fmt)
    runner.check_shape(samples["x"].shape)
    row = _common_row(runner, samples)
    if square_n > 0:
        row["square"] = square_accuracy(runner, samples, eps, square_n, square_queries, seed)
    row.update(size_mb=path.stat().st_size / 2**20, latency_b1_ms=median_latency_ms(runner, samples["x"], 1),
               latency_b64_ms=median_latency_ms(runner, samples["x"], 64))
    return row


def square_accuracy(run, samples: dict[str, np.ndarray], eps: float, n: int, queries: int, seed: int) -> float:
    """Black-box robust accuracy: pyautoattack's Square attack querying ``run`` (no gradients)."""
    from robustedge.attacks import autoattack

    x = torch.from_numpy(samples["x"][:n])
    y = torch.from_numpy(samples["y"][:n])
    _, y_adv = autoattack(RunnerModule(run), x, y, eps=eps, version="custom", attacks=["square"], seed=seed,
                          batch_size=max(1, n), device="cpu", square_queries=queries)
    return float((y_adv == y).float().mean())


def square_for_torch(model: torch.nn.Module, samples: dict[str, np.ndarray], eps: float, n: int, queries: int,
                     seed: int) -> float:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return square_accuracy(run, samples, eps, n, queries, seed)


def format_table(table: dict[str, dict]) -> str:
    keys = [k for k in ("clean", "agreement", "transfer_pgd20", "transfer_autoattack", "square") if
            any(k in r for r in table.values())]
    extra = ["size_mb", "latency_b1_ms", "latency_b64_ms"]
    head = "| format | " + " | ".join(k.replace("_", " ") + (" (%)" if k not in extra else "") for k in keys) + \
           " | size (MB) | latency b1 (ms) | latency b64 (ms) |"
    lines = [head, "|---|" + "---:|" * (len(keys) + 3)]
    for fmt, row in table.items():
        cells = [f"{100 * row[k]:.1f}" if k in row else "" for k in keys]
        cells += [f"{row['size_mb']:.3f}", f"{row['latency_b1_ms']:.2f}", f"{row['latency_b64_ms']:.2f}"]
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
