"""B-MTARD: MTARD + Entropy-Based Balance of the teachers' temperatures.

Follows zhaoshiji123/MTARD-extension ``resnet18_mtard_cifar10.py`` (its per-step block). Teacher
targets are softmax(Ta(x') / tau_adv) and softmax(Tn(x) / tau_nat), the student at temperature 1 and
no tau^2 factor. After every step, with H_a and H_n the mean entropies of the two targets (the
released ``entropy_value``, ``losses.released_entropy_value``), the higher-entropy teacher is
sharpened and the lower-entropy one softened by g, within [1, 10], until the entropies meet; the new
temperatures are used from the next step. The loss weights are balanced inside the step, before the
backward (``mtard.py``). g (0.001) and the loss-balance eta (0.025) are multiplied by 0.1 at the
learning-rate milestones. The forward order and the attack are MTARD's (``mtard.py``).
"""

from __future__ import annotations

import torch

from robustedge.methods import register
from robustedge.methods.mtard import MultiTeacherBase

TAU_MIN, TAU_MAX = 1.0, 10.0


def entropy_balance(tau_adv: torch.Tensor, tau_nat: torch.Tensor, h_adv: torch.Tensor, h_nat: torch.Tensor,
                    g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """tau_adv <- clip(tau_adv - g sign(H_a/H_n - 1)); tau_nat <- clip(tau_nat - g sign(H_n/H_a - 1)).

    ``h_adv``/``h_nat`` may be entropies or the released (negative, /C) entropy values: only their
    ratio enters."""
    new_adv = (tau_adv - g * torch.sign(h_adv / h_nat - 1.0)).clamp(TAU_MIN, TAU_MAX)
    new_nat = (tau_nat - g * torch.sign(h_nat / h_adv - 1.0)).clamp(TAU_MIN, TAU_MAX)
    return new_adv, new_nat


@register
class BMTARD(MultiTeacherBase):
    name = "bmtard"
    defaults = {"eta": 0.025, "w_adv": 0.5, "g": 0.001, "tau_start": 1.0, "kl_factor": 1.0}
    positive = ("kl_factor",)
    panels = {"temperature": ("tau_adv", "tau_nat"), "loss weight": ("w_adv", "w_nat")}
    entropy_balance = True

    def after_step(self, logs: dict) -> None:
        h_adv, h_nat = self._entropies
        self.tau_adv, self.tau_nat = entropy_balance(self.tau_adv, self.tau_nat, h_adv, h_nat,
                                                     self.args["g"] * self.decay())
