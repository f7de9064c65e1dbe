"""PGD-AT (Madry et al. 2018): cross-entropy on CE-PGD examples from a uniform start in the eps-ball.

Follows MadryLab/cifar10_challenge: ``pgd_attack.py`` starts at x + U(-eps, eps) clipped to the image
range and takes signed steps of the summed cross-entropy; ``train.py`` attacks ``Model(mode='train')``,
whose batch norm (``model.py``: ``is_training=(self.mode == 'train')``, ``updates_collections=None``)
uses batch statistics and moves its moving averages at every attack forward: train mode here too.
(Its config takes 10 steps of 2/255 in 8/255; the steps are the recipe's ``attack`` settings.)
"""

import torch.nn.functional as F

from robustedge.methods import register
from robustedge.methods.base import Method, accuracy


@register
class PGDAT(Method):
    name = "pgd_at"
    released_start = "uniform"
    released_mode = "train"

    def step(self, student, x, y):
        x_adv = self.perturb(student, x, y, loss="ce")
        logits = student(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return loss, {"loss": loss.detach(), "train_acc": accuracy(logits.detach(), y)}
