"""``robustedge train/distill --dry-run``: what a run would do and cost, before committing hours.

Prints the resolved config, the parameter counts of the student and teachers, and the time per
epoch estimated from real training steps of this config on this device (synthetic data of the
dataset's shape, the trainer's own step). Teacher files that are not there yet are replaced by
random weights of their ``arch`` for the timing: speed does not depend on the values.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path

import torch

from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.config import TrainConfig, dump_config, validate_config
from robustedge.data import load_dataset
from robustedge.errors import RobustEdgeError, first_line
from robustedge.methods import get_method
from robustedge.runtime import resolve_device

# (channels, image size, classes, training images) for datasets whose files may not be here yet
NOMINAL = {"cifar10": (3, 32, 10, 50_000), "cifar100": (3, 32, 100, 50_000), "svhn": (3, 32, 10, 73_257)}


def _shape(cfg: TrainConfig) -> tuple[int, int, int, int, str]:
    """(channels, size, classes, training examples, where the numbers come from)."""
    try:
        data = load_dataset(cfg.data.name, cfg.data.root, image_size=cfg.data.image_size, channels=cfg.data.channels,
                            val_fraction=cfg.data.val_fraction, seed=cfg.data.seed)
        train = len(data.train.subset(cfg.data.train_n, cfg.data.seed))
        return (*data.input_shape[:2], data.num_classes, train, f"the {cfg.data.name} files")
    except RobustEdgeError as exc:
        if cfg.data.name not in NOMINAL:
            raise
        c, s, k, n = NOMINAL[cfg.data.name]
        s = cfg.data.image_size or s
        train = int(n * (1 - cfg.data.val_fraction))
        train = train if cfg.data.train_n is None else min(train, cfg.data.train_n)
        return c, s, k, train, f"nominal {cfg.data.name} sizes ({first_line(exc)})"


def _count(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def dry_run(cfg: TrainConfig, steps: int = 2, warmup: int = 1) -> str:
    """The report (also printed by the CLI); runs ``warmup + steps`` real steps to time one, or, with
    ``steps=0``, stops after the recipe and the student's size (no teacher built, no step run)."""
    from robustedge.training_parts import build_parts

    validate_config(cfg)  # as Trainer.run does: build_parts trusts a validated config
    device = resolve_device(cfg.device)
    channels, size, classes, n_train, source = _shape(cfg)
    spec = ModelSpec(cfg.model.arch, classes, channels, cfg.model.width, size, cfg.model.mean, cfg.model.std)
    method = get_method(cfg.method)
    lines = ["# resolved config", dump_config(cfg).rstrip(), "",
             f"data: {channels}x{size}x{size}, {classes} classes, {n_train} training images ({source}"
             + (f"; data.train_n {cfg.data.train_n})" if cfg.data.train_n is not None else ")"),
             f"student: {spec.arch} (width {spec.width}): {_count(spec.build())} parameters"]
    if steps == 0:
        return "\n".join(lines + ["timing skipped (--timing-steps 0)"]) + "\n"
    timing_cfg = copy.deepcopy(cfg)
    stand_ins = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role in method.teacher_roles:
            teacher = cfg.teachers.get(role)
            if teacher is None:
                raise RobustEdgeError(f"method '{cfg.method}' needs a {role} teacher (teachers.{role}.checkpoint)")
            if teacher.checkpoint.startswith("robustbench:") or Path(teacher.checkpoint).exists():
                continue
            if teacher.arch is None:
                raise RobustEdgeError(f"{role} teacher {teacher.checkpoint} not found, and no 'arch' to time a "
                                      f"stand-in with")
            tspec = ModelSpec(teacher.arch, classes, channels, teacher.width, size, teacher.mean, teacher.std)
            stand_in = save_model(Path(tmp) / f"{role}.safetensors", tspec.build(), ModelMeta(tspec, dataset="synthetic"))
            stand_ins[role] = (f"{teacher.arch} (width {teacher.width}; {teacher.checkpoint} not found: "
                               f"random weights for the timing)")
            timing_cfg.teachers[role] = copy.deepcopy(teacher)
            timing_cfg.teachers[role].checkpoint, timing_cfg.teachers[role].arch = str(stand_in), None
        parts = build_parts(timing_cfg, spec, device, 1, classes)
        for role, teacher in parts.method.teachers.items():
            lines.append(f"{role} teacher: {stand_ins.get(role, cfg.teachers[role].checkpoint)}: "
                         f"{_count(teacher.model)} parameters as run (conv+BN folded), {teacher.dtype}")
        student = parts.wrap()
        student.train()
        batch = cfg.batch_size
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, channels, size, size, generator=gen).to(device)
        y = torch.randint(0, classes, (batch,), generator=gen).to(device)
        times = []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            logs, _ = parts.step(student, x, y)
            float(logs["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    per_step = sorted(times)[len(times) // 2]
    steps_per_epoch = math.ceil(n_train / batch)
    epoch = per_step * steps_per_epoch
    lines += [f"device: {device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else f"device: {device} "
              f"({torch.cuda.get_device_name(device)})",
              f"one step (batch {batch}, {cfg.method}, {cfg.attack.steps} attack steps): {per_step:.3f} s "
              f"(median of {steps} after {warmup} warm-up) = {batch / per_step:.1f} img/s",
              f"estimated time per epoch: {_duration(epoch)} ({steps_per_epoch} steps); "
              f"{cfg.epochs} epochs: {_duration(epoch * cfg.epochs)} (training only; validation adds a little)"]
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
