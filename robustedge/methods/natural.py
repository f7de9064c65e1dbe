"""Natural training: cross-entropy on clean inputs (how the clean teachers are trained)."""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy


@register
class Natural(Method):
    name = "natural"
    adversarial = False

    def step(self, student, x, y):
        logits = student(x)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"loss": loss.detach(), "train_acc": accuracy(logits.detach(), y)}
