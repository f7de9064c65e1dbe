"""TRADES (Zhang et al. 2019): CE(S(x), y) + beta * KL(S(x) || S(x')), x' maximising that KL.

Follows yaodongyu/TRADES ``trades.py``: the attack in eval mode from x + 0.001 N(0, I) on the summed
KL to S(x); the robust term is the KL summed over classes divided by the batch size
(``losses.kl_batchmean``), its target S(x) keeping its gradient. Ours: the released code runs S(x)
a second time in train mode for that target; the value and the gradient are the same, so the logits
of the CE term are reused (one forward pass less; the BN running statistics see the clean batch once
per step instead of twice).
"""

import torch
import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy
from robustedge.methods.losses import kl_batchmean


@register
class TRADES(Method):
    name = "trades"
    defaults = {"beta": 6.0}

    def step(self, student, x, y):
        with self.attack_net(student) as net:  # eval mode (auto), as in the TRADES code; its target S(x) too
            with torch.no_grad():
                target = F.softmax(net(x).float(), dim=1)
            x_adv = self.pgd(net, x, loss="kl", target_probs=target)
        logits_nat = student(x)
        logits_adv = student(x_adv)
        natural = F.cross_entropy(logits_nat.float(), y)
        # the target keeps its gradient here, as in the authors' code
        robust = kl_batchmean(logits_adv, F.softmax(logits_nat.float(), dim=1))
        loss = natural + self.args["beta"] * robust
        return loss, {"loss": loss.detach(), "loss_nat": natural.detach(), "loss_rob": robust.detach(),
                      "train_acc": accuracy(logits_adv.detach(), y)}
