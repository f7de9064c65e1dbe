"""MTARD (Zhao et al. 2022): a clean teacher Tn and a robust teacher Ta guide one student.

x' = CE-PGD-10 on the student; L_adv = KL(Ta(x') || S(x')), L_nat = KL(Tn(x) || S(x));
loss = w_adv * L_adv + w_nat * L_nat with the Normalization Loss Balance of the weights
(docs/design/training.md, "Training methods") and temperatures fixed at 1. B-MTARD (``bmtard.py``) adds the
Entropy-Based Balance of the temperatures.

Follows zhaoshiji123/MTARD ``mtard/mtard_resnet18_cifar10.py`` and ``mtard_loss.py``
(``mtard_inner_loss_ce``): the attack on the student in eval mode, from x + 0.001 N(0, I), on the
cross-entropy; then S(x') and S(x) in train mode, in that order; Ta sees x', Tn clean x (the scripts
call the teachers at other points of the step: frozen, in eval mode and drawing no random numbers,
when they run changes nothing). Each KL is the
released ``kl_loss`` averaged over batch x classes (``losses.released_kl``), times ``kl_factor`` (the
CIFAR-100 scripts: 10). MTARD's script updates w_nat and sets w_adv = 1 - w_nat; B-MTARD's updates
both, clips at 0 and renormalises: from weights that sum to one with targets in [0, 1] and
eta < 1 the two are the same numbers, so both use the B-MTARD form.

Order, as in the authors' released code: the weights are updated from *this* step's (detached)
losses before the backward pass, and this step's loss uses the updated weights. All adaptive state
is kept as 0-dim tensors on the device and updated with tensor ops, so the balances cost no host
synchronisation; under DDP the losses are averaged over ranks first, so every rank holds the same
state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustedge.errors import RobustEdgeError
from robustedge.methods import register
from robustedge.methods.base import Method, accuracy, mean_over_ranks
from robustedge.methods.losses import released_entropy_value, released_kl


def loss_balance(w_adv: torch.Tensor, w_nat: torch.Tensor, l_adv: torch.Tensor, l_nat: torch.Tensor,
                 l0_adv: torch.Tensor, l0_nat: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalization Loss Balance: move the weights towards each loss's share of relative progress.

    r_i = L_i / L0_i; target_i = r_i / (r_adv + r_nat); w_i <- w_i - eta * (w_i - target_i);
    clip at 0 and renormalise to sum 1. The term whose loss has fallen least gets more weight.
    """
    r_adv, r_nat = l_adv / l0_adv, l_nat / l0_nat
    total = r_adv + r_nat
    w_adv = (w_adv - eta * (w_adv - r_adv / total)).clamp(min=0.0)
    w_nat = (w_nat - eta * (w_nat - r_nat / total)).clamp(min=0.0)
    norm = w_adv + w_nat
    return w_adv / norm, w_nat / norm


class MultiTeacherBase(Method):
    teacher_roles = ("robust", "clean")
    defaults = {"eta": 0.025, "w_adv": 0.5, "kl_factor": 1.0}
    positive = ("kl_factor",)
    panels = {"loss weight": ("w_adv", "w_nat")}
    entropy_balance = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= self.args["w_adv"] <= 1.0:
            raise RobustEdgeError(f"w_adv must be in [0, 1], got {self.args['w_adv']}")
        t = lambda v: torch.tensor(float(v), device=self.device)  # noqa: E731
        self.w_adv, self.w_nat = t(self.args["w_adv"]), t(1.0 - self.args["w_adv"])
        self.tau_adv, self.tau_nat = t(self.args.get("tau_start", 1.0)), t(self.args.get("tau_start", 1.0))
        self.l0_adv, self.l0_nat = t(0.0), t(0.0)  # zero until the first step records them
        self._entropies: torch.Tensor | None = None  # (H_adv, H_nat) of the last step, for after_step

    def step(self, student, x, y):
        x_adv = self.perturb(student, x, y, loss="ce")
        logits_adv = student(x_adv)
        logits_nat = student(x)
        p_adv = F.softmax(self.teachers["robust"](x_adv) / self.tau_adv, dim=1)
        p_nat = F.softmax(self.teachers["clean"](x) / self.tau_nat, dim=1)
        factor = self.args["kl_factor"]
        l_adv = factor * released_kl(logits_adv, p_adv)
        l_nat = factor * released_kl(logits_nat, p_nat)
        self._balance_weights(l_adv.detach(), l_nat.detach())  # before the backward, as the authors do
        loss = self.w_adv * l_adv + self.w_nat * l_nat
        if self.entropy_balance:
            self._entropies = mean_over_ranks(torch.stack([released_entropy_value(p_adv),
                                                           released_entropy_value(p_nat)]))
        return loss, {"loss": loss.detach(), "loss_adv": l_adv.detach(), "loss_nat": l_nat.detach(),
                      "train_acc": accuracy(logits_adv.detach(), y)}

    def _balance_weights(self, l_adv: torch.Tensor, l_nat: torch.Tensor) -> None:
        """Normalization Loss Balance from this step's losses (the first step's are L0)."""
        l_adv, l_nat = mean_over_ranks(torch.stack([l_adv, l_nat]).float())
        first = self.l0_adv == 0  # tensor: no host sync
        self.l0_adv = torch.where(first, l_adv, self.l0_adv)
        self.l0_nat = torch.where(first, l_nat, self.l0_nat)
        self.w_adv, self.w_nat = loss_balance(self.w_adv, self.w_nat, l_adv, l_nat, self.l0_adv, self.l0_nat,
                                              self.args["eta"] * self.decay())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w_adv": self.w_adv, "w_nat": self.w_nat, "tau_adv": self.tau_adv, "tau_nat": self.tau_nat,
                "l0_adv": self.l0_adv, "l0_nat": self.l0_nat}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise RobustEdgeError(f"method '{self.name}' state needs {sorted(expected)}, checkpoint has {sorted(state)}")
        for key, value in state.items():
            setattr(self, key, value.to(self.device, torch.float32).reshape(()))


@register
class MTARD(MultiTeacherBase):
    name = "mtard"
