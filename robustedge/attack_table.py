"""What every attack of the library is, in one place: the training attack's settings (``AttackConfig``)
and the table of evaluation attacks (name, loss, steps, step size as a fraction of eps, restarts, start)
that eval, export, the flags, the app and the report all read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AttackConfig:
    """The inner maximisation used during training."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float = 2 / 255
    # auto: the method's released start (gaussian x + init_std * N(0, I) for TRADES/RSLAD/MTARD/B-MTARD,
    # uniform_unprojected for ARD, uniform for PGD-AT); or gaussian, uniform, uniform_unprojected, none
    start: str = "auto"
    init_std: float = 0.001
    # the student's mode while attacked. auto: the method's released code (train for ARD, eval otherwise)
    mode: str = "auto"
