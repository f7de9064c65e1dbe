"""ARD (Goldblum et al. 2020): alpha * tau^2 * KL(T(x)/tau || S(x')/tau) + (1 - alpha) * CE(S(x), y).

x' is CE-PGD on the student; the robust teacher sees clean x. Defaults are the ARD paper's
CIFAR-10 values (alpha 1, tau 30). Our choice: with alpha = 1 the CE term is skipped instead of
computed and multiplied by zero (same loss, one forward pass less).
"""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy, kl_batchmean


@register
class ARD(Method):
    name = "ard"
    teacher_roles = ("robust",)
    defaults = {"alpha": 1.0, "tau": 30.0}

    def step(self, student, x, y):
        alpha, tau = self.args["alpha"], self.args["tau"]
        x_adv = self.perturb(student, x, y, loss="ce")
        teacher_logits = self.teachers["robust"](x)
        logits_adv = student(x_adv)
        distill = kl_batchmean(logits_adv.float() / tau, F.softmax(teacher_logits / tau, dim=1))
        loss = alpha * tau * tau * distill
        logs = {"loss_kd": distill.detach(), "train_acc": accuracy(logits_adv.detach(), y)}
        if alpha < 1.0:
            natural = F.cross_entropy(student(x).float(), y)
            loss = loss + (1.0 - alpha) * natural
            logs["loss_nat"] = natural.detach()
        logs["loss"] = loss.detach()
        return loss, logs
