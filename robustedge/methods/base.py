"""The interface every training method implements, and the helpers they share.

A method turns one batch into a loss: ``step(student, x, y) -> (loss, logs)``. The trainer owns
everything else (optimiser, schedule, AMP, DDP, checkpoints). Methods with adaptive state
(B-MTARD) keep it as 0-dim tensors on the device, updated without host syncs, and expose it
through ``state_dict`` so it is checkpointed and restored on resume.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from robustedge.attacks import pgd
from robustedge.config import AttackConfig
from robustedge.errors import RobustEdgeError


def kl_batchmean(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(student)) summed over classes, averaged over the batch (DESIGN.md s.3)."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), target_probs.float(), reduction="batchmean")


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean()


def attack_view(student: nn.Module) -> nn.Module:
    """The student without its DDP wrapper: attacks need input gradients only, and running them
    through DDP would arm its gradient reducer for a backward that never reaches the weights."""
    return student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student


class Method:
    name: ClassVar[str] = ""
    teacher_roles: ClassVar[tuple[str, ...]] = ()  # e.g. ("robust",) or ("robust", "clean")
    defaults: ClassVar[dict[str, Any]] = {}  # method_args and their paper defaults
    adversarial: ClassVar[bool] = True

    def __init__(self, args: dict[str, Any], attack: AttackConfig, teachers: dict[str, nn.Module],
                 milestones: list[int] | None = None, gamma: float = 0.1,
                 device: torch.device | str = "cpu") -> None:
        unknown = set(args) - set(self.defaults)
        if unknown:
            raise RobustEdgeError(f"method '{self.name}' has no argument(s) {', '.join(sorted(unknown))}; "
                                  f"valid: {', '.join(sorted(self.defaults)) or 'none'}")
        missing = [r for r in self.teacher_roles if r not in teachers]
        if missing:
            raise RobustEdgeError(f"method '{self.name}' needs teacher(s): {', '.join(missing)} "
                                  f"(config 'teachers.{missing[0]}.checkpoint')")
        self.args = {**self.defaults, **args}
        self.attack_cfg = attack
        self.teachers = teachers
        self.milestones = list(milestones or [])
        self.gamma = gamma
        self.device = torch.device(device)
        self.epoch = 0
        # the trainer's BN-folded twin of the student (models/folding.py); None: attack the student itself
        self.attack_twin: nn.Module | None = None

    # -- hooks the trainer calls --------------------------------------------------------------
    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, logs: dict) -> None:
        """Adaptive updates after the optimiser step (B-MTARD's balances)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def decay(self) -> float:
        """The factor the learning rate has at this epoch (for hyper-parameters decayed with it)."""
        return self.gamma ** sum(1 for m in self.milestones if m <= self.epoch)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise RobustEdgeError(f"method '{self.name}' has no state but the checkpoint holds {sorted(state)}")

    def summary(self) -> dict[str, float]:
        """Per-epoch values worth logging (reads tensors: call at logging points only)."""
        return {k: float(v) for k, v in self.state_dict().items() if v.numel() == 1}

    # -- shared pieces --------------------------------------------------------------------------
    @contextmanager
    def eval_view(self, student: nn.Module) -> Iterator[nn.Module]:
        """The student as the training-time attack sees it: in eval mode, as in the papers' code.

        With a folded twin that is the same function with conv+BN merged (refreshed from the
        student's current weights here), which makes every attack pass cheaper; otherwise the
        student itself, switched to eval mode and back.
        """
        if self.attack_twin is not None:
            self.attack_twin.refresh()  # (through torch.compile's wrapper when compiled)
            yield self.attack_twin
            return
        net = attack_view(student)
        was_training = net.training
        net.eval()
        try:
            yield net
        finally:
            net.train(was_training)

    def pgd(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss: str = "ce",
            target_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The configured training attack on ``net`` (already in its eval view)."""
        a = self.attack_cfg
        return pgd(net, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps, loss=loss,  # type: ignore[arg-type]
                   target_probs=target_probs, start=a.start, init_std=a.init_std)  # type: ignore[arg-type]

    def perturb(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss: str = "ce",
                target_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The training-time attack on the student's eval view."""
        with self.eval_view(student) as net:
            return self.pgd(net, x, y, loss, target_probs)
