"""The interface every training method implements, and the helpers they share.

A method turns one batch into a loss: ``step(student, x, y) -> (loss, logs)``. The trainer owns
everything else (optimiser, schedule, AMP, DDP, checkpoints). Methods with adaptive state
(B-MTARD) keep it as 0-dim tensors on the device, updated without host syncs, and expose it
through ``state_dict`` so it is checkpointed and restored on resume.

Each method also says how its released code runs the training attack (``released_start``,
``released_mode``): the random start, and whether the student is in eval mode (BN running
statistics, as RSLAD, MTARD, B-MTARD and TRADES do) or in train mode (batch statistics, and every
attack forward moves the running statistics, as ARD's ``AttackPGD`` and Madry et al.'s TensorFlow
model built with ``mode='train'`` do). The config's
``attack.start`` / ``attack.mode`` default to ``auto``, which means exactly that.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from robustedge.attacks import pgd
from robustedge.attack_table import AttackConfig
from robustedge.errors import RobustEdgeError
from robustedge.options import parse_number


FP16_ATTACK_LOSS_SCALE = 2.0 ** 12  # lifts gradients of ~1e-9 (confident examples) into fp16's range


def fp16_autocast(device: torch.device) -> bool:
    """Is float16 autocast on for ``device``'s type (the trainer's amp: fp16)?"""
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over DDP ranks (itself in one process): adaptive method state is
    computed from the global batch, so every rank holds the same state (a collective, no host sync)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def attack_view(student: nn.Module) -> nn.Module:
    """The student without its DDP wrapper: attacks need input gradients only, and running them
    through DDP would arm its gradient reducer for a backward that never reaches the weights. Under
    ``compile: true`` the trainer compiles the DDP-wrapped model, so the wrapper is looked for inside
    torch.compile's too (a compiled model without DDP is attacked compiled)."""
    inner = getattr(student, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    return student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student


class Method:
    name: ClassVar[str] = ""
    teacher_roles: ClassVar[tuple[str, ...]] = ()  # e.g. ("robust",) or ("robust", "clean")
    defaults: ClassVar[dict[str, Any]] = {}  # method_args and their paper defaults
    positive: ClassVar[tuple[str, ...]] = ()  # method_args that must be > 0
    adversarial: ClassVar[bool] = True
    released_start: ClassVar[str] = "gaussian"  # the released code's attack start (attack.start: auto)
    released_mode: ClassVar[str] = "eval"  # the student's mode during the released code's attack (attack.mode: auto)
    # figure panels of the per-epoch values :meth:`summary` logs (the report draws one per entry)
    panels: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """``method_args`` with every value of its default's type; unknown names refused."""
        unknown = set(args) - set(cls.defaults)
        if unknown:
            raise RobustEdgeError(f"method '{cls.name}' has no argument(s) {', '.join(sorted(unknown))}; "
                                  f"valid: {', '.join(sorted(cls.defaults)) or 'none'}")
        checked = {}
        for key, value in args.items():
            where = f"method_args.{key}"
            if isinstance(cls.defaults[key], bool):
                if not isinstance(value, bool):
                    raise RobustEdgeError(f"config key '{where}' expects a boolean (true/false), got {value!r}")
            elif isinstance(cls.defaults[key], (int, float)):
                value = parse_number(value, f"config key '{where}'")
                if key in cls.positive and not value > 0:
                    raise RobustEdgeError(f"config key '{where}' must be > 0, got {value}")
            checked[key] = value
        return checked

    def __init__(self, args: dict[str, Any], attack: AttackConfig, teachers: dict[str, nn.Module],
                 milestones: list[int] | None = None, gamma: float = 0.1,
                 device: torch.device | str = "cpu") -> None:
        args = self.check_args(args)
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
        self.attack_start = self.released_start if attack.start == "auto" else attack.start
        self.attack_mode = self.released_mode if attack.mode == "auto" else attack.mode
        # the trainer's BN-folded twin of the student (models/folding.py), for eval-mode attacks only;
        # None: attack the student itself
        self.attack_twin: nn.Module | None = None
        self.last_adversarial: torch.Tensor | None = None  # the last training attack's x' (set by pgd)

    # -- hooks the trainer calls --------------------------------------------------------------
    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_step(self, logs: dict) -> None:
        """Adaptive updates after the optimiser step (B-MTARD's temperatures)."""

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
        """Per-epoch values worth logging: every key named in :attr:`panels` (reads tensors: call at
        logging points only). The epoch line, metrics.csv and the report all follow this."""
        state = self.state_dict()
        return {k: float(state[k]) for keys in self.panels.values() for k in keys}

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

    @contextmanager
    def train_view(self, student: nn.Module) -> Iterator[nn.Module]:
        """The student in train mode for an attack (ARD's released code): batch statistics, and each
        forward moves the BN running statistics, as there. No DDP wrapper (see :func:`attack_view`)."""
        net = attack_view(student)
        was_training = net.training
        net.train()
        try:
            yield net
        finally:
            net.train(was_training)

    def pgd(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss: str = "ce",
            target_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The configured training attack on ``net`` (already in the mode the attack runs in). Under fp16
        autocast (amp: fp16) its loss is scaled before the backward, as GradScaler does for the weights:
        unscaled, the input gradients of confident examples underflow and the attack stalls on them."""
        a = self.attack_cfg
        x_adv = pgd(net, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps, loss=loss,  # type: ignore[arg-type]
                    target_probs=target_probs, start=self.attack_start, init_std=a.init_std,  # type: ignore[arg-type]
                    loss_scale=FP16_ATTACK_LOSS_SCALE if fp16_autocast(x.device) else 1.0)
        self.last_adversarial = x_adv  # this step's x' (QAT's float-teacher term distils on it too)
        return x_adv

    def attack_net(self, student: nn.Module):
        """The student as the training attack sees it (:meth:`train_view` or :meth:`eval_view`, by the
        resolved ``attack_mode``), as a context manager."""
        return self.train_view(student) if self.attack_mode == "train" else self.eval_view(student)

    def perturb(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, loss: str = "ce",
                target_probs: torch.Tensor | None = None) -> torch.Tensor:
        """The training-time attack, on the student in the mode the method's attack runs in."""
        with self.attack_net(student) as net:
            return self.pgd(net, x, y, loss, target_probs)
