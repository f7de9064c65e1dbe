"""L-inf attacks on [0, 1] images: FGSM, PGD (CE / KL-to-target / CW margin), CW-inf, AutoAttack.

Contract shared by every attack here:
- inputs and outputs are in [0, 1] and the output stays inside the eps-ball around the input;
- the model is used in whatever mode it was given (the trainer puts the student in eval mode
  while attacking, as the papers do; evaluation does the same);
- only the input gradient is computed (``torch.autograd.grad`` on x), so no parameter ``.grad``
  is touched and no weight-gradient kernels run;
- losses are summed over the batch so each example's step does not depend on the batch size.

AutoAttack is the authors' own implementation from ``pyautoattack``, imported lazily.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robustedge.attack_table import ATTACKS, AttackSpec
from robustedge.errors import RobustEdgeError

AttackLoss = Literal["ce", "kl", "cw"]
Start = Literal["uniform", "uniform_unprojected", "gaussian", "none"]
logger = logging.getLogger("robustedge.attacks")


def check_eps(eps: float) -> float:
    if not 0.0 <= float(eps) <= 1.0:
        raise RobustEdgeError(f"eps must be in [0, 1] (pixel scale), got {eps}")
    return float(eps)


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0) -> torch.Tensor:
    """Per-example CW margin loss -max(z_y - max_{j!=y} z_j, -kappa): larger once misclassified.

    Same as ``cwloss`` in the RSLAD/TRADES evaluation code (kappa = 50).
    """
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    real = (onehot * logits).sum(1)
    other = ((1.0 - onehot) * logits - onehot * 1e4).amax(1)
    return -torch.clamp(real - other + kappa, min=0.0)


def attack_loss(logits: torch.Tensor, y: torch.Tensor | None, loss: AttackLoss,
                target_probs: torch.Tensor | None = None, kappa: float = 50.0) -> torch.Tensor:
    """The summed objective an attack ascends."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "kl":  # KL(target || model), the TRADES / RSLAD inner maximisation
        return F.kl_div(F.log_softmax(logits, dim=1), target_probs.float(), reduction="sum")
    if loss == "cw":
        return cw_margin(logits, y, kappa).sum()
    raise RobustEdgeError(f"unknown attack loss '{loss}'; valid: ce, kl, cw")


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss: AttackLoss,
                   target_probs: torch.Tensor | None = None, kappa: float = 50.0,
                   loss_scale: float = 1.0) -> torch.Tensor:
    """d loss / d x. ``loss_scale`` multiplies the loss first, for backward passes in fp16 (AMP), where
    the small gradients of confidently classified examples underflow to zero and PGD stalls there; the
    attacks use only the gradient's sign, which scaling does not change (non-finite entries become 0)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = attack_loss(model(x), y, loss, target_probs, kappa)
        (grad,) = torch.autograd.grad(value * loss_scale if loss_scale != 1.0 else value, x)
    return grad if loss_scale == 1.0 else torch.nan_to_num(grad, nan=0.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps on the cross-entropy (Goodfellow et al.)."""
    grad = input_gradient(model, x, y, "ce")
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float, step_size: float,
        steps: int, loss: AttackLoss = "ce", target_probs: torch.Tensor | None = None, start: Start = "uniform",
        init_std: float = 0.001, kappa: float = 50.0, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None, loss_scale: float = 1.0) -> torch.Tensor:
    """Projected gradient ascent in the L-inf ball (``loss_scale``: see :func:`input_gradient`).

    ``start='uniform'`` draws U(-eps, eps) and clips to [0, 1] (Madry et al.; the evaluation protocol);
    ``noise``, U[0, 1) draws shaped like ``x``, replaces the draw (the evaluation's per-example seeds,
    robustedge/sharding.py). ``'uniform_unprojected'`` is the same draw without the clip before the
    first gradient (ARD's released ``AttackPGD``); ``'gaussian'`` is x + init_std * N(0, I), the start of
    the RSLAD, MTARD, B-MTARD and TRADES codes. As in those codes, such a start is not projected, every
    step is.
    ``loss='kl'`` needs ``target_probs``; ``'ce'`` and ``'cw'`` need ``y``.
    """
    if loss == "kl" and target_probs is None:
        raise ValueError("loss='kl' needs target_probs")
    if loss in ("ce", "cw") and y is None:
        raise ValueError(f"loss='{loss}' needs labels y")
    x = x.detach()
    if start in ("uniform", "uniform_unprojected"):
        if noise is None:
            noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_adv = x + (noise.to(x) * (2 * eps) - eps)
        if start == "uniform":
            x_adv = x_adv.clamp_(0.0, 1.0)
    elif start == "gaussian":
        x_adv = x + init_std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    elif start == "none":
        x_adv = x.clone()
    else:
        raise ValueError(f"unknown start '{start}'; valid: uniform, uniform_unprojected, gaussian, none")
    lower, upper = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    for _ in range(steps):
        grad = input_gradient(model, x_adv, y, loss, target_probs, kappa, loss_scale)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), lower), upper)
    if steps == 0:
        x_adv = torch.min(torch.max(x_adv, lower), upper)
    return x_adv.detach()


def cw_inf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
           steps: int = 30, kappa: float = 50.0, generator: torch.Generator | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """CW-inf: the CW margin loss optimised by PGD from a uniform start (as in TRADES/RSLAD eval)."""
    return pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, loss="cw", kappa=kappa,
               start="uniform", generator=generator, noise=noise)


def run_table_attack(spec: AttackSpec | str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                     steps: int | None = None, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples by one gradient attack of :data:`robustedge.attack_table.ATTACKS`, with its
    loss, step size and start (``steps`` overrides the table's, for the app's interactive budget).
    The batched and query-only ones (AutoAttack, APGD-CE, Square, DIVA) have their own entry points:
    :func:`autoattack` and :func:`disagreement` take their settings from the same table."""
    spec = ATTACKS.get(spec) if isinstance(spec, str) else spec
    steps = spec.steps if steps is None else steps
    if spec.loss == "ce" and spec.start == "none" and steps == 1 and spec.step_ratio == (1.0, 1.0):
        return fgsm(model, x, y, eps)
    if spec.loss == "ce":
        return pgd(model, x, y, eps=eps, step_size=spec.step_size(eps), steps=steps, generator=generator, noise=noise)
    if spec.loss == "cw":
        return cw_inf(model, x, y, eps=eps, step_size=spec.step_size(eps), steps=steps, generator=generator,
                      noise=noise)
    raise RobustEdgeError(f"attack '{spec.name}' ({spec.loss}) is not a gradient attack of run_table_attack")


def disagreement(reference: nn.Module, target: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 step_size: float, steps: int = 20, c: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DIVA-style attack (Hao et al., MLSys 2022): maximise p_ref(y | x') - c * p_target(y | x').

    It looks for inputs that the ``target`` (the deployed INT8 artifact's twin) gets wrong while the
    ``reference`` (the float model) still gets right: the adversarial examples a float-only
    evaluation cannot see. PGD with sign steps from a uniform start, projected onto the eps ball.
    """
    x = x.detach()
    noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * (2 * eps) - eps
    x_adv = (x + noise).clamp_(0.0, 1.0)
    lower, upper = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    for _ in range(steps):
        with torch.enable_grad():
            xg = x_adv.detach().requires_grad_(True)
            p_ref = F.softmax(reference(xg).float(), dim=1).gather(1, y[:, None])
            p_target = F.softmax(target(xg).float(), dim=1).gather(1, y[:, None])
            objective = (p_ref - c * p_target).sum()
            (grad,) = torch.autograd.grad(objective, xg)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), lower), upper)
    return x_adv.detach()


# --------------------------------------------------------------------------------------------
# AutoAttack (pyautoattack: the authors' code)
# --------------------------------------------------------------------------------------------

AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class _Forward(logging.Handler):
    """Re-emits pyautoattack's records on our logger so users control them in one place."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def _route_autoattack_logs() -> None:
    source = logging.getLogger("auto-attack")
    if not any(isinstance(h, _Forward) for h in source.handlers):
        source.addHandler(_Forward(logging.getLogger("robustedge.autoattack")))
        source.setLevel(logging.DEBUG)
        source.propagate = False


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str = "standard",
               attacks: list[str] | None = None, seed: int = 0, batch_size: int = 250,
               device: torch.device | str | None = None, apgd_iters: int | None = None,
               apgd_restarts: int | None = None, square_queries: int | None = None,
               query_model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run pyautoattack's ``AutoAttack`` (``standard`` = APGD-CE, APGD-T, FAB-T, Square 5000).

    ``version='custom'`` with ``attacks`` picks a subset (for example ``['square']`` for a
    query-only attack). ``apgd_iters``/``apgd_restarts``/``square_queries`` change the budgets
    for interactive use and the export's black-box check; evaluations leave them unset. Returns ``(x_adv, y_adv)`` exactly as the package does.

    ``query_model`` (default: ``model.query_model`` where ``model`` has one, see
    :class:`robustedge.runners.QueriedTwin`) answers the Square stage's queries instead of
    ``model``: the runtime of an exported file whose differentiable twin ``model`` is. Square uses
    outputs only, so it can ask the function being measured itself, exactly and far faster than the
    interpreted twin (5,000 queries per surviving example); APGD and FAB keep differentiating ``model``,
    and AutoAttack's own bookkeeping (which examples each stage broke) stays on ``model`` as the package
    does it. Where ``query_model`` returns ``model``'s logits, the result is the package's, per example.
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise RobustEdgeError(f"AutoAttack needs the 'pyautoattack' package: {exc}") from None
    if version not in ("standard", "plus", "rand", "custom"):
        raise RobustEdgeError(f"unknown AutoAttack version '{version}'; valid: standard, plus, rand, custom")
    if version == "custom":
        bad = [a for a in attacks or [] if a not in AUTOATTACK_ATTACKS]
        if not attacks or bad:
            raise RobustEdgeError(f"custom AutoAttack needs attacks from {', '.join(AUTOATTACK_ATTACKS)}"
                                  + (f"; unknown: {', '.join(bad)}" if bad else ""))
    elif attacks:
        raise RobustEdgeError("an AutoAttack attack list needs version 'custom'")
    _route_autoattack_logs()
    device = device or x.device
    adversary = AutoAttack(model, norm="Linf", eps=check_eps(eps), version=version,
                           attacks=attacks if version == "custom" else None, device=device, seed=seed)
    if square_queries is not None:
        adversary.square.n_queries = square_queries
    query_model = query_model if query_model is not None else getattr(model, "query_model", None)
    if query_model is not None:
        adversary.square.predict = query_model  # SquareAttack calls only self.predict (pyautoattack/square.py)
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        if apgd_iters is not None:
            apgd.n_iter = apgd_iters
        if apgd_restarts is not None:
            apgd.n_restarts = apgd_restarts
    return adversary.run_standard_evaluation(x, y, batch_size=batch_size)
