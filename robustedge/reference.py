"""The reference training step: the loop as the authors' released code writes it (ARD, RSLAD, MTARD,
B-MTARD, TRADES): the ground truth the trainer's step is tested against (tests/test_fast_paths.py,
the trainer's step is compared with it in tests/test_fast_paths.py) and the baseline bench/train_step.py
measures its speed against.

Style kept on purpose: a per-sample ``DataLoader`` over PIL images with torchvision transforms
(``num_workers=0`` as in the MTARD scripts), fp32 everywhere, models with their BatchNorms, one
forward pass per use, teachers in fp32 under ``no_grad``, the balances as Python floats read with
``.item()``. Each branch transcribes its released file: the losses as written there (``kl_loss`` with
its ``1e-5`` and ``torch.mean`` for RSLAD/MTARD/B-MTARD, ``nn.KLDivLoss()`` for ARD, TRADES' sum over
the batch size), the attack's start and the student's mode during it (train mode for ARD), which
teacher sees which input, and B-MTARD's per-step block in its order (weights from this step's losses
before the backward, which uses the updated weights; temperatures used from the next step).

Nothing else in the library uses this module: it exists to be straightforward and slow in the
authors' way.
"""

from __future__ import annotations


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


def kl_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The released ``kl_loss`` of RSLAD, MTARD and B-MTARD (elementwise; the callers take ``torch.mean``)."""
    return -a * b + torch.log(b + 1e-5) * b


def entropy_value(a: torch.Tensor) -> torch.Tensor:
    """B-MTARD's released ``entropy_value`` (elementwise; the caller takes ``torch.mean``)."""
    return torch.log(a + 1e-5) * a


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
    """MTARD / B-MTARD: maximise the cross-entropy (mean over the batch, as ``nn.CrossEntropyLoss()``)."""
    return inner_max(model, x, lambda logits: F.cross_entropy(logits, y), eps, step_size, steps)


def uniform_pgd_ce(model, x, y, eps, step_size, steps, clip_start: bool):
    """Signed steps of the summed CE from x + U(-eps, eps), each projected onto the eps-ball and [0, 1],
    the model in the mode it is in: PGD-AT (MadryLab/cifar10_challenge pgd_attack.py, the start clipped
    to the image range, on ``Model(mode='train')``) and ARD's ``AttackPGD`` (not clipped before the first
    gradient, under ``net.train()``)."""
    x_adv = x.detach() + torch.zeros_like(x).uniform_(-eps, eps)
    if clip_start:
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def pgd_kl(model, x, target_fn, eps, step_size, steps):
    """RSLAD / TRADES: maximise KL(target || S(x')) summed; ``target_fn()`` is re-evaluated every step as
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
        factor = a.get("kl_factor", 1.0)  # the CIFAR-100 scripts' 10
        s.train()
        self.optimizer.zero_grad()
        if self.method == "natural":
            loss = F.cross_entropy(s(x), y)
        elif self.method == "pgd_at":
            loss = F.cross_entropy(s(uniform_pgd_ce(s, x, y, self.eps, self.step_size, self.steps, True)), y)
        elif self.method == "trades":
            def target():
                return F.softmax(s(x), dim=1)  # in eval mode inside the attack, as in trades.py
            x_adv = pgd_kl(s, x, lambda: target().detach(), self.eps, self.step_size, self.steps)
            logits = s(x)
            robust = F.kl_div(F.log_softmax(s(x_adv), dim=1), F.softmax(s(x), dim=1), reduction="sum") / len(x)
            loss = F.cross_entropy(logits, y) + a.get("beta", 6.0) * robust
        elif self.method == "ard":  # main.py: train()
            alpha, temp = a.get("alpha", 1.0), a.get("tau", 30.0)
            outputs = s(uniform_pgd_ce(s, x, y, self.eps, self.step_size, self.steps, False))
            teacher_outputs = self.teachers["robust"](x)
            basic_outputs = s(x)
            # nn.KLDivLoss() of the torch the authors ran: the elementwise mean (written out: newer torch
            # warns that reduction='mean' will turn into 'batchmean')
            kl = torch.mean(nn.KLDivLoss(reduction="none")(F.log_softmax(outputs / temp, dim=1),
                                                          F.softmax(teacher_outputs / temp, dim=1)))
            loss = alpha * temp * temp * kl + (1.0 - alpha) * nn.CrossEntropyLoss()(basic_outputs, y)
        elif self.method == "rslad":  # resnet18_rslad_cifar10.py
            with torch.no_grad():
                teacher_logits = self.teachers["robust"](x)
            target = F.softmax(teacher_logits, dim=1)
            x_adv = pgd_kl(s, x, lambda: target, self.eps, self.step_size, self.steps)
            adv_logits = s(x_adv)
            nat_logits = s(x)
            kl_loss1 = factor * torch.mean(kl_loss(F.log_softmax(adv_logits, dim=1), target))
            kl_loss2 = factor * torch.mean(kl_loss(F.log_softmax(nat_logits, dim=1), target))
            w = a.get("adv_weight", 5.0 / 6.0)
            loss = w * kl_loss1 + (1.0 - w) * kl_loss2
        elif self.method in ("mtard", "bmtard"):  # mtard_resnet18_cifar10.py / MTARD-extension resnet18_mtard_cifar10.py
            with torch.no_grad():
                teacher_nat_logits = self.teachers["clean"](x)
            x_adv = pgd_ce(s, x, y, self.eps, self.step_size, self.steps)
            student_adv_logits = s(x_adv)
            with torch.no_grad():
                teacher_adv_logits = self.teachers["robust"](x_adv)
            student_nat_logits = s(x)
            p_adv = F.softmax(teacher_adv_logits / self.tau_adv, dim=1)
            p_nat = F.softmax(teacher_nat_logits / self.tau_nat, dim=1)
            kl_loss1 = factor * torch.mean(kl_loss(F.log_softmax(student_adv_logits, dim=1), p_adv))
            kl_loss2 = factor * torch.mean(kl_loss(F.log_softmax(student_nat_logits, dim=1), p_nat))
            if self.method == "bmtard":  # computed at this step's temperatures, used from the next step
                self._balance_temperatures(p_adv, p_nat, self.decay * a.get("g", 0.001))
            self._balance_weights(kl_loss1.item(), kl_loss2.item(), self.decay * a.get("eta", 0.025))
            loss = self.w_adv * kl_loss1 + self.w_nat * kl_loss2  # this step's backward: the new weights
        else:
            raise ValueError(f"no reference step for {self.method}")
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _balance_weights(self, l_adv: float, l_nat: float, eta: float) -> None:
        """B-MTARD's Normalization Loss Balance on Python floats, as released (MTARD's
        ``w_adv = 1 - w_nat`` form gives the same numbers from weights that sum to one)."""
        if self.init_adv is None:
            self.init_adv, self.init_nat = l_adv, l_nat
        lhat_adv, lhat_nat = l_adv / self.init_adv, l_nat / self.init_nat
        lhat_avg = (lhat_adv + lhat_nat) / 2
        inv_adv, inv_nat = lhat_adv / lhat_avg, lhat_nat / lhat_avg
        w_nat = self.w_nat - eta * (self.w_nat - inv_nat / (inv_adv + inv_nat))
        w_adv = self.w_adv - eta * (self.w_adv - inv_adv / (inv_adv + inv_nat))
        w_adv, w_nat = max(w_adv, 0.0), max(w_nat, 0.0)
        coef = 1.0 / (w_adv + w_nat)
        self.w_adv, self.w_nat = w_adv * coef, w_nat * coef

    def _balance_temperatures(self, p_adv, p_nat, g: float) -> None:
        """B-MTARD's Entropy-Based Balance on Python floats, as released."""
        adv_entropy = torch.mean(entropy_value(p_adv.detach()))
        nat_entropy = torch.mean(entropy_value(p_nat.detach()))
        self.tau_adv = self.tau_adv - g * torch.sign(adv_entropy / nat_entropy - 1).item()
        self.tau_nat = self.tau_nat - g * torch.sign(nat_entropy / adv_entropy - 1).item()
        self.tau_adv = max(min(10.0, self.tau_adv), 1.0)
        self.tau_nat = max(min(10.0, self.tau_nat), 1.0)
