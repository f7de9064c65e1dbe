"""Attack-failure flags that need gradients: is the attack that measured robustness working at all?

A robustness number is only as good as the attack behind it. Carlini et al. ("On Evaluating
Adversarial Robustness", 2019) and Pintor et al. ("Indicators of Attack Failure", NeurIPS 2022) list
the symptoms of an attack that failed rather than a model that resisted; these checks look for them
on the first ``n`` examples (docs/design/flags.md, "Attack-failure flags"):

- ``zero_gradients``: the input gradient of the loss is exactly zero on correctly classified examples
  (a non-differentiable or saturated model masks gradients; the attacks cannot move);
- ``flat_loss``: examples that survived PGD-20 whose loss at the adversarial example is not above the
  loss at the clean input (the attack made no progress at all);
- ``large_radius``: accuracy at a radius of ``large_factor`` x eps (at most 1) is not near zero: every
  model is breakable at a large enough radius, so a high accuracy there means the attack is failing;
- ``more_steps``: PGD-100 with random restarts lowers accuracy by more than a point, and on more than
  one example, below the reported figure (the per-example worst case over the reported iterative
  attacks: PGD, CW, AutoAttack; never FGSM, nor the flags' own Square): the evaluation had not
  converged. One example is not evidence: on 64 examples it is 1.6 points, and a stronger attack
  breaking one more example of a non-robust model is ordinary. Without a reported iterative attack
  there is nothing to judge, and the check does not run.

The checks judge masking, not the user's choice of attacks: an evaluation of clean accuracy alone runs
none, and FGSM alone is a note that it is weak, never a failure. Their cost is bounded by the suite's
(:func:`checks_budget_n`): a fraction of it, counted in model passes, so the same evaluation runs the same
checks on every machine.

The comparisons that need only replays (black-box or transfer beating white-box) live in the
torch-free :mod:`robustedge.verifier`, so a bundle's own verifier recomputes them on the device.

Every check measures correctness with ``correct_fn``: the model itself in ``robustedge eval``, the
runtime (replaying examples crafted on the twin) when an exported artifact is checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robustedge.attack_table import ATTACKS
from robustedge.attacks import run_table_attack
from robustedge.errors import RobustEdgeError
from robustedge.options import check_range, parse_fraction, parse_number, parse_positive
from robustedge.verifier import make_flag

Correct = Callable[[torch.Tensor, torch.Tensor], np.ndarray]  # (x, y) -> per-example correctness


@dataclass
class FlagSettings:
    """Budgets and thresholds of the checks (fractions are of the examples checked)."""

    n: int = 100  # examples the checks run on (the first n)
    large_factor: float = 4.0  # the large radius, as a multiple of eps (capped at 1)
    large_threshold: float = 0.10  # accuracy above this at the large radius fires large_radius
    steps: int = ATTACKS["pgd100"].steps  # the stronger PGD of more_steps ...
    restarts: int = ATTACKS["pgd100"].restarts  # ... with this many random restarts
    more_steps_points: float = 0.01  # fires when the stronger PGD is lower by more than this ...
    more_steps_examples: int = 2  # ... and breaks at least this many more examples
    tolerance: float = 0.005  # zero_gradients / flat_loss fire above this fraction
    square_queries: int = ATTACKS["square"].queries  # the black-box Square run of `robustedge eval` (on the same n examples)
    budget: float = 0.5  # `robustedge eval`: the checks may cost at most this fraction of the suite's passes ...
    min_n: int = 10  # ... and do not run on fewer examples than this (too few to judge anything)

    def validate(self) -> "FlagSettings":
        for name in ("n", "steps", "restarts", "square_queries", "more_steps_examples", "min_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RobustEdgeError(f"flag setting '{name}' must be an integer >= 1, got {value!r}")
        for name in ("large_threshold", "more_steps_points", "tolerance"):
            parse_fraction(getattr(self, name), f"flag setting '{name}'")
        parse_positive(self.budget, "flag setting 'budget'")
        check_range(parse_number(self.large_factor, "flag setting 'large_factor'"), "flag setting 'large_factor'", 1)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def check_passes(settings: FlagSettings, *, pgd20_given: bool, judge_reported: bool) -> float:
    """Model passes (forward + input gradient = 1, a forward alone = 1/3) the checks cost per example:
    the input gradient, PGD-20 unless the suite's examples are reused, the large radius, and, when there is a
    reported iterative attack to judge, PGD-``steps`` x ``restarts`` and Square's queries."""
    passes = 1 + (0 if pgd20_given else 20) + 20 + 2 / 3
    if judge_reported:
        passes += settings.steps * settings.restarts + settings.square_queries / 3
    return passes


def checks_budget_n(settings: FlagSettings, n_examples: int, suite_passes: float, per_example: float) -> int:
    """How many examples the checks run on: ``settings.n``, the examples evaluated, and as many as fit in
    ``settings.budget`` x the suite's passes, whichever is least; 0 (they do not run) below ``settings.min_n``."""
    allowed = settings.budget * suite_passes
    fit = int(allowed // per_example) if math.isfinite(allowed) else settings.n
    n = min(settings.n, n_examples, fit)
    return n if n >= settings.min_n else 0


def model_correct(model: nn.Module, batch_size: int = 256) -> Correct:
    """Correctness measured on the model itself."""
    def correct(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            logits = torch.cat([model(xb) for xb in x.split(batch_size)])
        return (logits.argmax(1) == y).cpu().numpy()
    return correct


def more_steps_fires(reported: np.ndarray, strong: np.ndarray, settings: FlagSettings) -> bool:
    """Did the stronger PGD beat the reported per-example robustness by more than the settings allow?"""
    broken = int((reported & ~strong).sum())
    return reported.mean() - strong.mean() > settings.more_steps_points and broken >= settings.more_steps_examples


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x).float(), y, reduction="none")


def gradient_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, correct_fn: Correct,
                   settings: FlagSettings, seed: int = 0, pgd20: torch.Tensor | None = None,
                   reported: np.ndarray | None = None) -> tuple[list[dict], dict]:
    """The four gradient checks on the first ``settings.n`` examples: (flags, diagnostics).

    ``model`` is what the attacks differentiate (the model, or an artifact's twin); ``pgd20`` may pass
    the suite's PGD-20 examples for these inputs so they are not crafted twice; ``reported`` is the
    per-example robustness the evaluation reports (the worst case over its iterative attacks), which
    ``more_steps`` must not beat; None (no iterative attack reported): ``more_steps`` does not run.
    """
    settings.validate()
    x, y = x[:settings.n], y[:settings.n]
    n = len(y)
    if n == 0 or eps == 0:
        return [], {}
    model.eval()
    flags, info = [], {"n": n}
    clean_ok = correct_fn(x, y)

    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = (grad.flatten(1).abs().sum(1) == 0).cpu().numpy() & clean_ok
    info["zero_gradients"] = int(zero.sum())
    if zero.sum() > settings.tolerance * max(1, clean_ok.sum()):
        flags.append(make_flag("zero_gradients", zero.sum(), int(clean_ok.sum()),
                               "the attacks cannot move these inputs (masked or saturated gradients)"))

    gen = torch.Generator(device=x.device).manual_seed(seed)
    adv = pgd20[:n] if pgd20 is not None else run_table_attack("pgd20", model, x, y, eps, generator=gen)
    survived = correct_fn(adv, y)
    flat = (_losses(model, adv, y) <= _losses(model, x, y)).cpu().numpy() & survived
    info["flat_loss"] = int(flat.sum())
    if flat.sum() > settings.tolerance * max(1, survived.sum()):
        flags.append(make_flag("flat_loss", flat.sum(), int(survived.sum()),
                               "PGD-20 ended at a loss no higher than the clean input's"))

    radius = min(1.0, settings.large_factor * eps)
    large = correct_fn(run_table_attack("pgd20", model, x, y, radius, generator=gen), y)
    info["large_radius_accuracy"], info["large_radius"] = float(large.mean()), radius
    if large.mean() > settings.large_threshold:
        flags.append(make_flag("large_radius", large.sum(), n, f"{100 * large.mean():.1f}% accuracy at eps "
                               f"{radius:.4g} ({settings.large_factor:g} x eps); expected near 0"))

    info["pgd20_accuracy"] = float(survived.mean())
    if reported is None:
        return flags, info
    strong = np.ones(n, dtype=bool)
    for restart in range(settings.restarts):
        restart_gen = torch.Generator(device=x.device).manual_seed(seed + 1 + restart)
        strong &= correct_fn(run_table_attack("pgd100", model, x, y, eps, steps=settings.steps,
                                              generator=restart_gen), y)
    base, label = np.asarray(reported[:n], dtype=bool), "the reported worst case"
    info["strong_pgd_accuracy"] = float(strong.mean())
    info["reported_accuracy"] = float(base.mean())
    if more_steps_fires(base, strong, settings):
        flags.append(make_flag("more_steps", int((base & ~strong).sum()), n,
                               f"PGD-{settings.steps} x {settings.restarts} restarts: {100 * strong.mean():.1f}% vs "
                               f"{label} {100 * base.mean():.1f}%"))
    return flags, info


def square_examples(run, samples: dict[str, np.ndarray], eps: float, n: int, queries: int, seed: int,
                    what: str = "the model") -> np.ndarray:
    """pyautoattack's Square attack querying ``run`` (outputs only) on the first ``n`` examples."""
    from robustedge.attacks import autoattack
    from robustedge.runners import RunnerModule

    x = torch.from_numpy(samples["x"][:n])
    y = torch.from_numpy(samples["y"][:n])
    x_adv, _ = autoattack(RunnerModule(run, what), x, y, eps=eps, version="custom", attacks=["square"], seed=seed,
                          batch_size=max(1, n), device="cpu", square_queries=queries)
    return x_adv.numpy().astype(np.float32)
