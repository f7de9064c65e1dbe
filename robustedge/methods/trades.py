"""TRADES (Zhang et al. 2019): CE(S(x), y) + beta * KL(S(x) || S(x')), x' maximising that KL."""

import torch
import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy, kl_batchmean


@register
class TRADES(Method):
    name = "trades"
    defaults = {"beta": 6.0}

    def step(self, student, x, y):
        with self.eval_view(student) as net:  # the attack's target S(x) is taken in eval mode, as in the TRADES code
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
