"""What every attack of the library is, in one place: the training attack's settings (``AttackConfig``)
and the table of evaluation attacks (name, loss, steps, step size as a fraction of eps, restarts, start)
that eval, export, the flags, the app and the report all read."""

from __future__ import annotations

from dataclasses import dataclass

from robustedge.registry import Registry


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


CIFAR_EPS = 8 / 255  # the radius the released step sizes were written for


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack as every part of the library runs it.

    ``step_ratio``: the step size is ``eps * step_ratio[0] / step_ratio[1]``, kept as a ratio so that the
    released constants are reproduced bit for bit (TRADES' 0.003 at 8/255 is ``(0.003, 8/255)``).
    ``steps``/``restarts`` are the defaults: the app lets a visitor change the steps, and the
    attack-failure flags take theirs from ``FlagSettings`` (which defaults to this table's)."""

    name: str
    description: str
    loss: str  # ce | cw | disagreement | autoattack | apgd-ce | square | none
    steps: int = 0
    step_ratio: tuple[float, float] = (1.0, 4.0)
    restarts: int = 1
    start: str = "uniform"  # uniform (U(-eps, eps), clipped: Madry et al.) | none
    queries: int = 0  # query-only attacks: model evaluations per example
    iterative: bool = False  # reported as robustness, and judged by the attack-failure checks

    def step_size(self, eps: float) -> float:
        return eps * self.step_ratio[0] / self.step_ratio[1]


ATTACK_TABLE: tuple[AttackSpec, ...] = (
    # the suite of `robustedge eval` (in this order), also what `robustedge export` crafts and replays
    AttackSpec("clean", "no attack", "none", start="none"),
    AttackSpec("fgsm", "FGSM, one step of eps", "ce", steps=1, step_ratio=(1.0, 1.0), start="none"),
    AttackSpec("pgd20", "PGD-20 CE, uniform start, step eps/4 (2/255 at 8/255; PGD_SAT)", "ce", steps=20,
               iterative=True),
    AttackSpec("pgd20_trades", "PGD-20 CE, uniform start, step 0.003 at 8/255 (PGD_TRADES)", "ce", steps=20,
               step_ratio=(0.003, CIFAR_EPS), iterative=True),
    AttackSpec("cw", "CW-inf: CW margin (kappa 50) by PGD, 30 steps of eps/4", "cw", steps=30, iterative=True),
    AttackSpec("autoattack", "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000), pyautoattack",
               "autoattack", iterative=True),
    # white-box on an exported INT8 file: float-vs-INT8 disagreement (DIVA, Hao et al., MLSys 2022)
    AttackSpec("diva", "DIVA: p_float(y) - p_int8(y) by PGD, 20 steps of eps/4", "disagreement", steps=20,
               iterative=True),
    # the attack-failure flags: a stronger PGD (more_steps) and the black-box Square of `robustedge eval`
    AttackSpec("pgd100", "PGD-100 CE x 2 restarts, step eps/10 (the more_steps check)", "ce", steps=100,
               step_ratio=(1.0, 10.0), restarts=2),
    AttackSpec("square", "Square (query-only, pyautoattack), 1,000 queries (the flags' black-box check)", "square",
               queries=1000, start="none"),
    # the browser demo's interactive budgets
    AttackSpec("apgd_ce", "APGD-CE (pyautoattack), one restart", "apgd-ce", steps=20),
    AttackSpec("square_demo", "Square (query-only, pyautoattack), 500 queries (the app)", "square", queries=500,
               start="none"),
)
ATTACKS: Registry[AttackSpec] = Registry("attack", {spec.name: spec for spec in ATTACK_TABLE})
SUITE_ATTACKS = ("clean", "fgsm", "pgd20", "pgd20_trades", "cw", "autoattack")  # `robustedge eval`, in order
