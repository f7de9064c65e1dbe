"""PGD-AT (Madry et al. 2018): cross-entropy on CE-PGD examples from a uniform start in the eps-ball."""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy


@register
class PGDAT(Method):
    name = "pgd_at"
    released_start = "uniform"  # MadryLab/cifar10_challenge pgd_attack.py: x + U(-eps, eps), clipped to the image range

    def step(self, student, x, y):
        x_adv = self.perturb(student, x, y, loss="ce")
        logits = student(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"loss": loss.detach(), "train_acc": accuracy(logits.detach(), y)}
