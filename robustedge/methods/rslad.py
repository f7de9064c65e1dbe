"""RSLAD (Zi et al. 2021): robust soft labels only, no hard labels anywhere.

Follows zibojia/RSLAD ``resnet18_rslad_cifar10.py`` and ``rslad_loss.py``: the robust teacher on
clean x only (eval mode, no grad); x' maximises the summed KL(T(x) || S(x')) with the student in
eval mode, from x + 0.001 N(0, I); then S(x') and S(x) in train mode, in that order;
loss = 5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)), each KL the released ``kl_loss`` averaged over
batch x classes (``losses.released_kl``), times ``kl_factor`` (the CIFAR-100 scripts: 10).
Ours: the CIFAR-100 scripts take ``torch.log(F.softmax(...))`` of the student where the CIFAR-10 ones
take ``F.log_softmax``; the same values to rounding, except that the former is -inf (and the loss inf)
once a student probability underflows in fp32, so ``log_softmax`` is used for both.
"""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy
from robustedge.methods.losses import released_kl


@register
class RSLAD(Method):
    name = "rslad"
    teacher_roles = ("robust",)
    defaults = {"adv_weight": 5.0 / 6.0, "kl_factor": 1.0}
    positive = ("kl_factor",)

    def step(self, student, x, y):
        target = F.softmax(self.teachers["robust"](x), dim=1)
        x_adv = self.perturb(student, x, loss="kl", target_probs=target)
        logits_adv = student(x_adv)
        logits_nat = student(x)
        factor = self.args["kl_factor"]
        adv = factor * released_kl(logits_adv, target)
        nat = factor * released_kl(logits_nat, target)
        w = self.args["adv_weight"]
        loss = w * adv + (1.0 - w) * nat
        return loss, {"loss": loss.detach(), "loss_adv": adv.detach(), "loss_nat": nat.detach(),
                      "train_acc": accuracy(logits_adv.detach(), y)}
