"""The quantization-aware fine-tune of a trained float student, as one recipe measured as a whole.

``robustedge distill --qat-from FILE`` (no ``--config``), ``robustedge.train(qat_from=FILE)``,
``quickstart --qat`` and ``bench/qat_compare.py`` all build their QAT run here, from the float run's own
config (the one FILE records): the same method, teachers, data and attack, with

- a schedule that is a real fraction of the float run's: ``epoch_fraction`` of its epochs (``min_epochs`` at
  least), cosine from ``lr_fraction`` of its learning rate (the short 3-epoch fine-tune at lr 0.002
  recovered nothing, bench/RESULTS.md);
- the observers and batch-norm statistics frozen for the last ``freeze_epochs`` epochs (fewer in a
  fine-tune of fewer than three epochs: one epoch at least moves them), so the last steps train against
  the scales the export ships (PyTorch's QAT recipes end that way). Of the recipe's parts this one
  matters most: without it the fine-tune ended 4.5 points of worst case lower, below post-training
  INT8 (docs/results/qat.md), hence ``min_epochs`` 2, so a fine-tune of a short float run still has one
  frozen epoch;
- the float run's method state carried over (B-MTARD's temperatures and loss weights where the float run
  left them, not their initial values), when the float run's ``last.safetensors`` is beside FILE;
- the float student as an extra teacher of its fake-quantised copy on x and x' (``float_teacher``).

docs/design/qat.md section 10 gives the measurement behind each value. Flags and ``--set`` override any field
of the result, as they do for any config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from robustedge.checkpoint import read_meta, trained_method
from robustedge.config import QATConfig, TrainConfig, config_from_dict
from robustedge.errors import RobustEdgeError
from robustedge.options import parse_int


@dataclass(frozen=True)
class QATRecipe:
    epoch_fraction: float = 0.3  # of the float run's epochs
    min_epochs: int = 2  # one epoch with moving ranges and statistics, then at least one frozen
    lr_fraction: float = 0.1  # of the float run's (peak) learning rate, the start of the cosine
    schedule: str = "cosine"
    freeze_epochs: int = 2  # the last epochs against frozen scales and BN statistics (at most all of them)
    carry_method_state: bool = True  # when the float run's last.safetensors (same method) is beside FILE
    float_teacher: float = 1.0  # weight of KL(F(x) || Q(x)) + KL(F(x') || Q(x'))
    disagreement: float = 0.0  # weight of KL(F(x_d) || Q(x_d)) on DIVA examples: measured, not adopted


FINE_TUNE = QATRecipe()


def float_run_config(checkpoint: str | Path) -> TrainConfig:
    """The config the float student in ``checkpoint`` was trained with, as the model file records it (so a
    copied file still knows it), with ``out_dir`` set so the fine-tune lands beside the float run's folder.
    Paths inside it (teachers, data root) are as the float run was given them: relative ones are read from
    the current folder."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise RobustEdgeError(f"--qat-from: {checkpoint} is a folder; give the float student's model file "
                              f"(e.g. {checkpoint / 'best.safetensors'})")
    if not checkpoint.is_file():
        raise RobustEdgeError(f"--qat-from: no such file {checkpoint}")
    meta = read_meta(checkpoint)
    if meta.extra.get("qat"):
        raise RobustEdgeError(f"{checkpoint} is already a QAT student; fine-tune from a float one")
    raw = meta.extra.get("config")
    if not isinstance(raw, dict):
        raise RobustEdgeError(f"{checkpoint} does not record the config it was trained with (files written by "
                              f"`robustedge train`/`distill` do); give its recipe with --config")
    cfg = config_from_dict(raw)
    if cfg.qat.float_control:  # its recorded config is already a fine-tune: the recipe would shrink it again
        raise RobustEdgeError(f"{checkpoint} is the float control of a fine-tune of {cfg.qat.from_checkpoint}; "
                              f"fine-tune from that float student instead")
    cfg.out_dir = str(checkpoint.resolve().parent.parent)
    return cfg


def fine_tune_config(float_cfg: TrainConfig, checkpoint: str | Path, recipe: QATRecipe = FINE_TUNE, *,
                     epochs: int | None = None, state_beside: bool | None = None) -> TrainConfig:
    """``float_cfg``'s QAT fine-tune from ``checkpoint`` under ``recipe``: a new run ``<name>_qat`` beside it.

    ``epochs``: the fine-tune's length when the caller sets it (a flag); what depends on it (validation,
    the frozen epochs) follows. ``state_beside``: whether the float run's ``last.safetensors`` is (or, for a
    run not trained yet, will be) beside ``checkpoint``; None looks, and carries the state only when it
    is there and from the same method."""
    cfg = copy.deepcopy(float_cfg)
    cfg.name = f"{float_cfg.name}_qat"
    cfg.epochs = epochs if epochs is not None else max(recipe.min_epochs, round(float_cfg.epochs * recipe.epoch_fraction))
    cfg.eval_every = cfg.epochs
    cfg.optim.lr = float(f"{float_cfg.optim.lr * recipe.lr_fraction:.6g}")  # 0.08, not 0.08000000000000002
    cfg.optim.schedule = recipe.schedule
    cfg.optim.milestones = [max(1, cfg.epochs - 1)]  # read only by a piecewise schedule set over the recipe
    if state_beside is None:  # a file copied away from its run folder has no training state beside it
        last = Path(checkpoint).parent / "last.safetensors"
        state_beside = last.is_file() and trained_method(last) == float_cfg.method
    # at least one epoch learns with moving ranges and batch statistics before the frozen ones
    freeze = min(recipe.freeze_epochs, max(0, cfg.epochs - 1))
    cfg.qat = QATConfig(enabled=True, activations=float_cfg.qat.activations, from_checkpoint=str(checkpoint),
                        calibration_n=float_cfg.qat.calibration_n, freeze_epochs=freeze,
                        carry_method_state=recipe.carry_method_state and state_beside,
                        float_teacher=recipe.float_teacher, disagreement=recipe.disagreement)
    return cfg


def float_control_config(qat: TrainConfig) -> TrainConfig:
    """The float control of the QAT fine-tune ``qat``: the same start, epochs, schedule, carried method state
    and float teacher, without fake quantisers (so without observers to freeze: ``freeze_epochs`` 0), in a
    run of its own (``_qat`` in the name becomes ``_float_control``). Exported with post-training INT8, it
    measures what the fine-tune's extra training buys without quantisation awareness."""
    control = copy.deepcopy(qat)
    control.qat.enabled, control.qat.float_control, control.qat.freeze_epochs = False, True, 0
    control.qat.disagreement = 0.0  # there is no INT8 function to disagree with
    stem, qat_mark, tag = qat.name.rpartition("_qat")
    control.name = f"{stem}_float_control{tag}" if qat_mark else f"{qat.name}_float_control"
    return control


def recipe_config(checkpoint: str | Path, epochs: object = None) -> TrainConfig:
    """The fine-tune `distill --qat-from FILE` runs without --config (``epochs``: --epochs, when given)."""
    if epochs is not None:
        epochs = parse_int(epochs, "epochs", 1)
    return fine_tune_config(float_run_config(checkpoint), checkpoint, epochs=epochs)


__all__ = ["FINE_TUNE", "QATRecipe", "fine_tune_config", "float_control_config", "float_run_config",
           "recipe_config"]
