"""The reference training step: the loop as the authors' released code writes it (RSLAD, MTARD,
B-MTARD, TRADES): the ground truth the trainer's step is tested against (tests/test_fast_paths.py,
tests/test_methods.py) and the baseline bench/train_step.py measures its speed against.

Style kept on purpose: a per-sample ``DataLoader`` over PIL images with torchvision transforms
(``num_workers=0`` as in the MTARD scripts), fp32 everywhere, models with their BatchNorms, the
student switched to eval for the attack and back, one forward pass per use (TRADES recomputes its
target), teachers in fp32 under ``no_grad``, the B-MTARD balances as Python floats read with
``.item()``, in the authors' order: the loss weights are updated from this step's losses before the
backward, which uses the updated weights; the temperatures after it, used from the next step. Loss
definitions are docs/design.md's (KL with ``batchmean``), so that a step's loss is the same number as
our trainer's on the same batch and the same random start.

Nothing else in the library uses this module: it exists to be straightforward and slow in the
authors' way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


class PILImages(torch.utils.data.Dataset):
    """HWC uint8 images served one at a time as PIL images, like torchvision's CIFAR10."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_loader(images_nchw: torch.Tensor, labels: torch.Tensor, batch_size: int, padding: int = 4):
    from torchvision import transforms

    size = images_nchw.shape[-1]
    transform = transforms.Compose([transforms.RandomCrop(size, padding=padding), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor()])
    hwc = images_nchw.permute(0, 2, 3, 1).numpy()
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    return torch.utils.data.DataLoader(PILImages(hwc, labels.numpy(), transform), batch_size=batch_size,
                                       shuffle=True, num_workers=0)


def kl(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(student_logits, dim=1), target_probs, reduction="batchmean")


def inner_max(model, x, objective, eps, step_size, steps):
    """The inner maximisation of the released codes (mtard_inner_loss_ce, rslad_inner_loss, TRADES'
    trades_loss): sign-gradient ascent on ``objective(logits)`` from x + 0.001 N(0, I), the student
    in eval mode, projected onto the eps-ball and [0, 1] after every step."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=x.device).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = objective(model(x_adv))
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def pgd_ce(model, x, y, eps, step_size, steps):
    """MTARD / ARD / PGD-AT: maximise the cross-entropy."""
    return inner_max(model, x, lambda logits: F.cross_entropy(logits, y), eps, step_size, steps)


def pgd_kl(model, x, target_fn, eps, step_size, steps):
    """RSLAD / TRADES: maximise KL(target || S(x')); ``target_fn()`` is re-evaluated every step as
    in the TRADES code (RSLAD passes fixed teacher probabilities)."""
    return inner_max(model, x, lambda logits: F.kl_div(F.log_softmax(logits, dim=1), target_fn(), reduction="sum"),
                     eps, step_size, steps)


class ReferenceStep:
    """One optimisation step per method, in the authors' style; ``state`` holds B-MTARD's floats."""

    def __init__(self, method: str, student: nn.Module, teachers: dict[str, nn.Module], optimizer,
                 eps: float, step_size: float, steps: int, args: dict) -> None:
        self.method, self.student, self.teachers, self.optimizer = method, student, teachers, optimizer
        self.eps, self.step_size, self.steps, self.args = eps, step_size, steps, args
        for t in teachers.values():
            t.eval()
        self.w_adv, self.w_nat, self.tau_adv, self.tau_nat = 0.5, 0.5, 1.0, 1.0
        self.init_adv = self.init_nat = None
        self.decay = 1.0  # g and eta's factor: 0.1 per learning-rate milestone passed (set by the caller)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        s, a = self.student, self.args
        s.train()
        self.optimizer.zero_grad()
        if self.method == "natural":
            loss = F.cross_entropy(s(x), y)
        elif self.method == "pgd_at":
            loss = F.cross_entropy(s(pgd_ce(s, x, y, self.eps, self.step_size, self.steps)), y)
        elif self.method == "trades":
            def target():
                return F.softmax(s(x), dim=1)  # in eval mode inside the attack, as in trades.py
            x_adv = pgd_kl(s, x, lambda: target().detach(), self.eps, self.step_size, self.steps)
            logits = s(x)
            loss = F.cross_entropy(logits, y) + a.get("beta", 6.0) * kl(s(x_adv), F.softmax(s(x), dim=1))
        elif self.method == "ard":
            alpha, tau = a.get("alpha", 1.0), a.get("tau", 30.0)
            with torch.no_grad():
                teacher_logits = self.teachers["robust"](x)
            x_adv = pgd_ce(s, x, y, self.eps, self.step_size, self.steps)
            loss = alpha * tau * tau * kl(s(x_adv) / tau, F.softmax(teacher_logits / tau, dim=1)) \
                + (1.0 - alpha) * F.cross_entropy(s(x), y)
        elif self.method == "rslad":
            with torch.no_grad():
                teacher_logits = self.teachers["robust"](x)
            target = F.softmax(teacher_logits, dim=1)
            x_adv = pgd_kl(s, x, lambda: target, self.eps, self.step_size, self.steps)
            w = a.get("adv_weight", 5.0 / 6.0)
            loss = w * kl(s(x_adv), target) + (1.0 - w) * kl(s(x), target)
        elif self.method in ("mtard", "bmtard"):
            with torch.no_grad():
                teacher_nat_logits = self.teachers["clean"](x)
            x_adv = pgd_ce(s, x, y, self.eps, self.step_size, self.steps)
            student_adv_logits = s(x_adv)
            with torch.no_grad():
                teacher_adv_logits = self.teachers["robust"](x_adv)
            student_nat_logits = s(x)
            p_adv = F.softmax(teacher_adv_logits / self.tau_adv, dim=1)
            p_nat = F.softmax(teacher_nat_logits / self.tau_nat, dim=1)
            loss_adv, loss_nat = kl(student_adv_logits, p_adv), kl(student_nat_logits, p_nat)
            self._balance_weights(loss_adv.item(), loss_nat.item(), self.decay * a.get("eta", 0.025))
            loss = self.w_adv * loss_adv + self.w_nat * loss_nat  # this step's backward: the new weights
            if self.method == "bmtard":
                self._balance_temperatures(p_adv, p_nat, self.decay * a.get("g", 0.001))  # used from the next step
        else:
            raise ValueError(f"no reference step for {self.method}")
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _balance_weights(self, l_adv: float, l_nat: float, eta: float) -> None:
        """MTARD's Normalization Loss Balance on Python floats."""
        if self.init_adv is None:
            self.init_adv, self.init_nat = l_adv, l_nat
        r_adv, r_nat = l_adv / self.init_adv, l_nat / self.init_nat
        w_adv = max(0.0, self.w_adv - eta * (self.w_adv - r_adv / (r_adv + r_nat)))
        w_nat = max(0.0, self.w_nat - eta * (self.w_nat - r_nat / (r_adv + r_nat)))
        self.w_adv, self.w_nat = w_adv / (w_adv + w_nat), w_nat / (w_adv + w_nat)

    def _balance_temperatures(self, p_adv, p_nat, g: float) -> None:
        """B-MTARD's Entropy-Based Balance on Python floats."""
        h_adv = -(p_adv * torch.log(p_adv.clamp_min(1e-12))).sum(1).mean().item()
        h_nat = -(p_nat * torch.log(p_nat.clamp_min(1e-12))).sum(1).mean().item()
        sign = lambda v: math.copysign(1.0, v) if v != 0 else 0.0  # noqa: E731
        self.tau_adv = min(10.0, max(1.0, self.tau_adv - g * sign(h_adv / h_nat - 1.0)))
        self.tau_nat = min(10.0, max(1.0, self.tau_nat - g * sign(h_nat / h_adv - 1.0)))
