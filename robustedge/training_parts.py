"""What one optimisation step needs, built from a config: the student (fake-quantised for QAT), its
teachers, the method, the optimiser and AMP. Shared by the trainer, the dry run and bench/train_step.py,
so the benchmark times the trainer's own step."""

from __future__ import annotations

import copy

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from robustedge.attacks import disagreement
from robustedge.checkpoint import ModelSpec
from robustedge.config import TrainConfig
from robustedge.errors import RobustEdgeError
from robustedge.methods import get_method
from robustedge.methods.losses import kl_div_mean
from robustedge.runtime import seed_everything
from robustedge.teachers import load_teacher


def _amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler)."""
    mode = cfg.amp
    if mode == "auto":
        # QAT stays fp32: under autocast the fake quantisers would see bf16 values, not the INT8
        # function the export computes (validate_config refuses an explicit amp with QAT); its float
        # control too, so that the two differ only by the quantisers
        fp32 = cfg.qat.enabled or cfg.qat.float_control
        mode = "bf16" if not fp32 and device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "off":
        return None, False
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        if device.type != "cuda":
            raise RobustEdgeError("amp fp16 needs CUDA; use amp bf16 or off on the CPU")
        return torch.float16, True
    raise RobustEdgeError(f"unknown amp mode '{cfg.amp}'; valid: auto, off, bf16, fp16")


@dataclass
class TrainingParts:
    """What one optimisation step needs, built from a config (shared by the trainer and bench/)."""

    cfg: TrainConfig
    model: nn.Module  # the student itself (no wrappers): checkpoints, validation
    method: "object"
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device
    params: list[torch.Tensor] = field(default_factory=list)  # what the gradient norm is taken over
    # QAT: the float student that also teaches (qat.float_teacher) and that DIVA sets Q against (qat.disagreement)
    float_teacher: nn.Module | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def wrap(self, world: int = 1, device: torch.device | None = None) -> nn.Module:
        """The student as the step sees it: compiled if asked, under DDP with several ranks."""
        net = self.model
        if world > 1:
            device = device or self.device
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        # compile the DDP-wrapped model (PyTorch's advice: its DDPOptimizer then splits the graph at the
        # gradient buckets so communication overlaps the backward); DDP(compile(model)) does not
        return torch.compile(net) if self.cfg.compile else net

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """One optimisation step; returns the method's logs and the gradient norm as device tensors."""
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None \
            else nullcontext()
        with autocast:
            self.method.last_adversarial = None
            loss, logs = self.method.step(student, x, y)
            for key, weight, term_of in (("loss_float_teacher", self.cfg.qat.float_teacher, self.float_teacher_loss),
                                         ("loss_disagreement", self.cfg.qat.disagreement, self.disagreement_loss)):
                if weight:
                    term = term_of(student, x, y)
                    loss = loss + weight * term
                    logs = {**logs, "loss": loss.detach(), key: term.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.params, float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(logs)
        return logs, grad_norm


    def float_teacher_loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """KL(F(x) || Q(x)) + KL(F(x') || Q(x')): the float student F teaches its fake-quantised copy Q the
        function it had, on the clean batch and on this step's training adversarial batch (when the method
        attacks). Each input gets its own forward, as the methods' own student forwards do, so batch norm
        sees the same batches it sees there. ``y`` is not needed: the extra terms share one signature."""
        inputs = [x] if self.method.last_adversarial is None else [self.method.last_adversarial, x]
        total = torch.zeros((), device=x.device)
        for batch in inputs:
            with torch.no_grad():
                target = torch.softmax(self.float_teacher(batch).float(), dim=1)
            total = total + kl_div_mean(student(batch), target)
        return total

    def disagreement_loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """KL(F(x_d) || Q(x_d)) on this step's DIVA examples x_d: the inputs, within the training attack's eps,
        where the fake-quantised student Q is least right while the float student F stays right (the attack
        the export runs on the INT8 file's twin, here with the training attack's step size and steps). The
        attack sees Q in eval mode, the function the export ships; the loss then teaches Q the float
        answer there, in training mode like the method's own forwards."""
        a = self.cfg.attack
        with self.method.eval_view(student) as net:
            x_d = disagreement(self.float_teacher, net, x, y, eps=a.eps, step_size=a.step_size, steps=a.steps)
        with torch.no_grad():
            target = torch.softmax(self.float_teacher(x_d).float(), dim=1)
        return kl_div_mean(student(x_d), target)


def build_parts(cfg: TrainConfig, spec: ModelSpec, device: torch.device, world: int = 1,
                num_classes: int | None = None) -> TrainingParts:
    """Student (seeded), teachers (folded, in their precision), method, optimiser and AMP scaler.

    With ``fold_attack`` the method attacks a linked conv+BN-folded twin of the student
    (models/folding.py), compiled along with the student when ``compile`` is set.
    """
    seed_everything(cfg.seed)
    model = spec.build().to(device)  # built even when replaced below: the seeded stream stays the same
    float_teacher = None  # the config's validation made sure it has a float student to come from
    if cfg.qat.from_checkpoint:
        model = _trained_start(cfg, spec).to(device)
        if cfg.qat.float_teacher or cfg.qat.disagreement:
            # the start itself, frozen, before fake quantisation or training touch it
            float_teacher = _frozen(copy.deepcopy(model))
    if cfg.qat.enabled:
        model = _qat_student(cfg, spec, model, world).to(device)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last and not cfg.qat.enabled:
        model = model.to(memory_format=torch.channels_last)
    method_cls = get_method(cfg.method)
    teachers = {role: load_teacher(cfg.teachers[role], num_classes or spec.num_classes, spec.in_channels,
                                   spec.image_size, device, cfg.data.name, channels_last=cfg.channels_last)
                for role in method_cls.teacher_roles if role in cfg.teachers}
    method = method_cls(cfg.method_args, cfg.attack, teachers, cfg.optim.milestones, cfg.optim.gamma, device)
    # QAT: attack the fake-quantised student; a train-mode attack (ARD) cannot run on an eval-only twin
    if cfg.fold_attack and method_cls.adversarial and not cfg.qat.enabled and method.attack_mode == "eval":
        from robustedge.models import fold_batchnorm

        twin = fold_batchnorm(model, linked=True)
        method.attack_twin = torch.compile(twin) if cfg.compile else twin
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    amp_dtype, use_scaler = _amp_settings(cfg, device)
    parts = TrainingParts(cfg, model, method, optimizer, torch.amp.GradScaler(device.type, enabled=use_scaler),
                          amp_dtype, device)
    parts.float_teacher = float_teacher
    return parts


def _frozen(model: nn.Module) -> nn.Module:
    """The float student a fine-tune starts from, in eval mode without gradients: its teacher
    (qat.float_teacher) and the reference its DIVA examples are set against (qat.disagreement)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _trained_start(cfg: TrainConfig, spec: ModelSpec) -> nn.Module:
    """The trained float student a fine-tune starts from (``qat.from_checkpoint``): under fake quantisation
    (QAT), or in float with ``qat.enabled: false``, the control that tells QAT's gain from more training."""
    from robustedge.weights import load_model

    source, meta = load_model(cfg.qat.from_checkpoint)
    if meta.extra.get("qat"):
        raise RobustEdgeError(f"{cfg.qat.from_checkpoint} is already a QAT student; fine-tune from a float one")
    if (meta.spec.arch, meta.spec.num_classes, meta.spec.in_channels, meta.spec.width, meta.spec.image_size) != \
            (spec.arch, spec.num_classes, spec.in_channels, spec.width, spec.image_size):
        raise RobustEdgeError(f"{cfg.qat.from_checkpoint} is {meta.spec.arch} (width {meta.spec.width}, "
                              f"{meta.spec.image_size}px, {meta.spec.in_channels} channels); the config trains "
                              f"{spec.arch} (width {spec.width}, {spec.image_size}px, {spec.in_channels} channels)")
    return source  # the same architecture, with the trained weights (load_model checked them strictly)


def _qat_student(cfg: TrainConfig, spec: ModelSpec, model: nn.Module, world: int) -> nn.Module:
    """The student under fake quantisation (with ``qat.from_checkpoint``, already the trained float one)."""
    from robustedge.qat import prepare_qat

    if world > 1:
        raise RobustEdgeError("quantization-aware training under DDP is not supported; run it in one process")
    return prepare_qat(model, spec.input_shape, cfg.qat.activations)
