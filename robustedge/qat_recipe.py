"""The quantization-aware fine-tune of a trained float student, as one recipe measured as a whole.

``robustedge distill --qat-from FILE`` (no ``--config``), ``robustedge.train(qat_from=FILE)``,
``quickstart --qat`` and ``bench/qat_compare.py`` all build their QAT run here, from the float run's own
config (its ``config.yaml`` beside FILE): the same method, teachers, data and attack, with

- a schedule that is a real fraction of the float run's: ``epoch_fraction`` of its epochs, cosine from
  ``lr_fraction`` of its learning rate (the short 3-epoch fine-tune at lr 0.002 recovered nothing,
  bench/RESULTS.md);
- the observers and batch-norm statistics frozen for the last ``freeze_epochs`` epochs, so the last
  steps train against the scales the export ships (PyTorch's QAT recipes end that way);
- the float run's method state carried over (B-MTARD's temperatures and loss weights where the float run
  left them, not their initial values), when the float run's ``last.safetensors`` is beside FILE;
- the float student as an extra teacher of its fake-quantised copy on x and x' (``float_teacher``).

docs/design.md section 10 gives the measurement behind each value. Flags and ``--set`` override any field
of the result, as they do for any config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from robustedge.config import QATConfig, TrainConfig, load_config
from robustedge.errors import RobustEdgeError


@dataclass(frozen=True)
class QATRecipe:
    epoch_fraction: float = 0.3  # of the float run's epochs (at least 1)
    lr_fraction: float = 0.1  # of the float run's (peak) learning rate, the start of the cosine
    schedule: str = "cosine"
    freeze_epochs: int = 2  # the last epochs against frozen scales and BN statistics (at most all of them)
    carry_method_state: bool = True  # where the method has state and the float run's last.safetensors exists
    float_teacher: float = 1.0  # weight of KL(F(x) || Q(x)) + KL(F(x') || Q(x'))


FINE_TUNE = QATRecipe()


def float_run_config(checkpoint: str | Path) -> TrainConfig:
    """The config the float student in ``checkpoint`` was trained with: its run folder's ``config.yaml``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise RobustEdgeError(f"--qat-from: no such file {checkpoint}")
    source = checkpoint.parent / "config.yaml"
    if not source.is_file():
        raise RobustEdgeError(f"--qat-from without --config reads the float run's config {source}, which does not "
                              f"exist; pass --config with the run's recipe")
    cfg = load_config(source)
    if cfg.qat.enabled:
        raise RobustEdgeError(f"{checkpoint} comes from a QAT run ({source}); fine-tune from a float student")
    return cfg


def fine_tune_config(float_cfg: TrainConfig, checkpoint: str | Path, recipe: QATRecipe = FINE_TUNE, *,
                     state_beside: bool | None = None) -> TrainConfig:
    """``float_cfg``'s QAT fine-tune from ``checkpoint`` under ``recipe``: a new run ``<name>_qat`` beside it.
    ``state_beside``: whether the float run's ``last.safetensors`` is (or, for a run not trained yet, will
    be) beside ``checkpoint``; None looks."""
    cfg = copy.deepcopy(float_cfg)
    cfg.name = f"{float_cfg.name}_qat"
    cfg.epochs = max(1, round(float_cfg.epochs * recipe.epoch_fraction))
    cfg.eval_every = cfg.epochs
    cfg.optim.lr = float(f"{float_cfg.optim.lr * recipe.lr_fraction:.6g}")  # 0.08, not 0.08000000000000002
    cfg.optim.schedule = recipe.schedule
    cfg.optim.milestones = [max(1, cfg.epochs - 1)]  # read only by a piecewise schedule set over the recipe
    # a method without state carries an empty one (a no-op); a checkpoint copied away from its run folder
    # has no training state beside it, and the fine-tune then starts the method afresh
    if state_beside is None:
        state_beside = (Path(checkpoint).parent / "last.safetensors").is_file()
    carry = recipe.carry_method_state and state_beside
    cfg.qat = QATConfig(enabled=True, activations=float_cfg.qat.activations, from_checkpoint=str(checkpoint),
                        calibration_n=float_cfg.qat.calibration_n, freeze_epochs=min(recipe.freeze_epochs, cfg.epochs),
                        carry_method_state=carry, float_teacher=recipe.float_teacher)
    return cfg


__all__ = ["FINE_TUNE", "QATRecipe", "fine_tune_config", "float_run_config"]
