"""ARD (Goldblum et al. 2020): alpha * tau^2 * KL(T(x)/tau || S(x')/tau) + (1 - alpha) * CE(S(x), y).

Follows goldblum/AdversariallyRobustDistillation ``main.py`` (``AttackPGD`` and ``train``):
- x' = CE-PGD on the student **in train mode** (``net.train()`` covers the attack): BN uses batch
  statistics and every attack forward moves the running statistics; the start is x + U(-eps, eps),
  not clipped to [0, 1] before the first gradient (``released_start``/``released_mode``);
- then S(x') in train mode, the robust teacher on clean x, and S(x) in train mode;
- the KL is ``nn.KLDivLoss()``: averaged over batch x classes (``losses.kl_div_mean``), times tau^2;
- defaults alpha = 1, tau = 30 (the released defaults).
With alpha = 1 the CE term is zero, but the released code still runs S(x) in train mode, which moves
the BN running statistics the evaluated student uses; so does this step, under ``no_grad`` (the same
statistics, no graph kept for a term whose weight is zero).
"""

import torch
import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy
from robustedge.methods.losses import kl_div_mean


@register
class ARD(Method):
    name = "ard"
    teacher_roles = ("robust",)
    defaults = {"alpha": 1.0, "tau": 30.0}
    positive = ("tau",)
    released_start = "uniform_unprojected"
    released_mode = "train"

    def step(self, student, x, y):
        alpha, tau = self.args["alpha"], self.args["tau"]
        x_adv = self.perturb(student, x, y, loss="ce")
        logits_adv = student(x_adv)
        teacher_logits = self.teachers["robust"](x)
        distill = kl_div_mean(logits_adv.float() / tau, F.softmax(teacher_logits / tau, dim=1))
        loss = alpha * tau * tau * distill
        logs = {"loss_kd": distill.detach(), "train_acc": accuracy(logits_adv.detach(), y)}
        if alpha < 1.0:
            natural = F.cross_entropy(student(x).float(), y)
            loss = loss + (1.0 - alpha) * natural
            logs["loss_nat"] = natural.detach()
        else:
            with torch.no_grad():
                student(x)  # the released clean forward: only its BN running-statistics update matters here
        logs["loss"] = loss.detach()
        return loss, logs
