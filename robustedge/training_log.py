"""The trainer's outputs per epoch: ``metrics.csv`` (rewritten atomically), the console line, TensorBoard."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from robustedge.files import atomic_write_text


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def epoch_line(name: str, row: dict, epochs: int, method_keys: list[str]) -> str:
    parts = [f"{name} epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"train acc {100 * row['train_acc']:.1f}%",
             f"{row['img_per_s']:.0f} img/s"]
    if "val_clean" in row:
        parts += [f"val clean {100 * row['val_clean']:.1f}%", f"val PGD-20 {100 * row['val_pgd20']:.1f}%"]
    parts += [f"{key} {row[key]:.3f}" for key in method_keys]  # the method's summary() (B-MTARD: taus, weights)
    return " | ".join(parts)
