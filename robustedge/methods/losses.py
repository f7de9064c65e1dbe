"""The teacher-student losses, each reduced exactly as the method's released code reduces it.

The reductions are not interchangeable. KL summed over classes and averaged over the batch
(``batchmean``) is C times the mean over batch x classes; with SGD, momentum and a fixed weight
decay a loss C times larger is a different training run (C times the step on the loss against the
same decay), not a rescaled learning rate. So each method keeps its authors' form, and the
papers' hyper-parameters keep the meaning they had there:

| method | released expression | here |
|---|---|---|
| RSLAD, MTARD, B-MTARD | ``kl_loss(a, b) = -a*b + torch.log(b + 1e-5)*b`` then ``torch.mean`` | :func:`released_kl` |
| ARD | ``nn.KLDivLoss()`` (reduction ``mean``: over batch x classes) | :func:`kl_div_mean` |
| TRADES | ``nn.KLDivLoss(size_average=False)`` divided by the batch size | :func:`kl_batchmean` |

(zibojia/RSLAD ``resnet18_rslad_cifar10.py``; zhaoshiji123/MTARD ``mtard/mtard_resnet18_cifar10.py``;
zhaoshiji123/MTARD-extension ``resnet18_mtard_cifar10.py``; goldblum/AdversariallyRobustDistillation
``main.py``; yaodongyu/TRADES ``trades.py``.) The authors' CIFAR-100 scripts multiply the RSLAD/MTARD
mean by 10 "to keep consistent with CIFAR-10": that factor is the recipes' ``method_args.kl_factor``,
visible in the recipe rather than hidden here.

The ``1e-5`` inside the released log changes the loss *value* (not its gradient: the target is a
constant), and B-MTARD's loss balance divides loss values, so it is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RELEASED_LOG_FLOOR = 1e-5  # the "+ 1e-5" of the released kl_loss and entropy_value


def released_kl(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """RSLAD / MTARD / B-MTARD: mean over batch x classes of b * (log(b + 1e-5) - log_softmax(s))."""
    a = F.log_softmax(student_logits.float(), dim=1)
    b = target_probs.float()
    return (-a * b + torch.log(b + RELEASED_LOG_FLOOR) * b).mean()


def kl_div_mean(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """ARD: ``nn.KLDivLoss()``, the exact KL averaged over batch x classes. Written as a sum over the
    element count: torch warns that its ``reduction='mean'`` will become ``'batchmean'``, which would
    silently make this C times larger."""
    elementwise = F.kl_div(F.log_softmax(student_logits.float(), dim=1), target_probs.float(), reduction="none")
    return elementwise.sum() / elementwise.numel()


def kl_batchmean(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """TRADES: the KL summed over classes and averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), target_probs.float(), reduction="batchmean")


def released_entropy_value(probs: torch.Tensor) -> torch.Tensor:
    """B-MTARD's ``torch.mean(entropy_value(p))`` with ``entropy_value(p) = log(p + 1e-5) * p``: minus
    the mean entropy divided by C. Only the ratio of two of them is used (the sign and C cancel), so
    it is computed in the authors' own form and order: a near-tie then rounds the way theirs does."""
    p = probs.float()
    return torch.mean(torch.log(p + RELEASED_LOG_FLOOR) * p)


__all__ = ["RELEASED_LOG_FLOOR", "kl_batchmean", "kl_div_mean", "released_entropy_value", "released_kl"]
