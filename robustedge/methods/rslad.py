"""RSLAD (Zi et al. 2021): robust soft labels only, no hard labels anywhere.

x' maximises KL(T(x) || S(x')); loss = 5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)).
The teacher is run on clean x only.
"""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy, kl_batchmean


@register
class RSLAD(Method):
    name = "rslad"
    teacher_roles = ("robust",)
    defaults = {"adv_weight": 5.0 / 6.0}

    def step(self, student, x, y):
        target = F.softmax(self.teachers["robust"](x), dim=1)
        x_adv = self.perturb(student, x, loss="kl", target_probs=target)
        logits_adv = student(x_adv)
        logits_nat = student(x)
        adv = kl_batchmean(logits_adv, target)
        nat = kl_batchmean(logits_nat, target)
        w = self.args["adv_weight"]
        loss = w * adv + (1.0 - w) * nat
        return loss, {"loss": loss.detach(), "loss_adv": adv.detach(), "loss_nat": nat.detach(),
                      "train_acc": accuracy(logits_adv.detach(), y)}
