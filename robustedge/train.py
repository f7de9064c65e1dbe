"""The trainer: one loop for every method, on CPU, one GPU or many (torchrun + DDP).

What the trainer owns: optimiser and schedule, AMP, channels_last / torch.compile, the NaN guard,
validation (clean + PGD-20 on the held-out split) with ``last`` and ``best`` checkpoints,
per-epoch metrics (CSV, TensorBoard when installed), resume, and DDP.

Determinism by construction: the data order and augmentation of an epoch are a function of
(seed, epoch) (see :class:`~robustedge.data.DeviceLoader`), the global RNG that drives the attack
starts is re-seeded from (seed, epoch, rank) at every epoch start, and the learning rate (like
B-MTARD's g and eta) is a function of the epoch. So a run resumed at an epoch boundary replays
exactly what the uninterrupted run did, and there is no sampler, scheduler or RNG state that could
drift out of step with the checkpoint.

Host syncs happen only every ``log_every`` steps and at epoch end: losses, accuracies and gradient
norms are accumulated as device tensors in between.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from robustedge.checkpoint import (ModelMeta, ModelSpec, atomic_write_json, atomic_write_text, load_state_strict,
                                   load_teacher, load_training_state, save_model, save_training_state, unwrap)
from robustedge.config import TrainConfig, config_to_dict, dump_config
from robustedge.data import DeviceLoader, load_dataset
from robustedge.errors import RobustEdgeError
from robustedge.evaluate import evaluate
from robustedge.methods import get_method
from robustedge.runtime import progress, resolve_device, seed_everything

EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_path: Path
    last_path: Path
    history: list[dict] = field(default_factory=list)
    best_score: float = float("-inf")  # validation W-Robust (clean accuracy for natural training)
    seconds: float = 0.0
    world_size: int = 1
    ranks_identical: bool | None = None


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The schedule as a pure function of the epoch (so resume needs no scheduler state)."""
    o = cfg.optim
    if o.schedule == "piecewise":
        return o.gamma ** sum(1 for m in o.milestones if m <= epoch)
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    if o.schedule == "constant":
        return 1.0
    raise RobustEdgeError(f"unknown schedule '{o.schedule}'; valid: piecewise, cosine, constant")


def _amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler)."""
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "off":
        return None, False
    if mode == "bf16":
        return torch.bfloat16, False
    if mode == "fp16":
        if device.type != "cuda":
            raise RobustEdgeError("amp fp16 needs CUDA; use amp bf16 or off on the CPU")
        return torch.float16, True
    raise RobustEdgeError(f"unknown amp mode '{cfg.amp}'; valid: auto, off, bf16, fp16")


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for key, value in unwrap(model).state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, callbacks: list[EpochCallback] | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.callbacks = list(callbacks or [])

    # ------------------------------------------------------------------------------------------
    def _setup_distributed(self) -> tuple[int, int, torch.device]:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(self.cfg.device)
        if world == 1:
            return 0, 1, device
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        rank = dist.get_rank()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return rank, world, device

    def _validate(self) -> None:
        cfg = self.cfg
        for name, value in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size), ("eval_every", cfg.eval_every),
                            ("log_every", cfg.log_every)):
            if value < 1:
                raise RobustEdgeError(f"{name} must be >= 1, got {value}")
        if not 0 <= cfg.attack.eps <= 1:
            raise RobustEdgeError(f"attack.eps must be in [0, 1], got {cfg.attack.eps}")
        if cfg.attack.steps < 0:
            raise RobustEdgeError(f"attack.steps must be >= 0, got {cfg.attack.steps}")
        if cfg.optim.lr <= 0:
            raise RobustEdgeError(f"optim.lr must be > 0, got {cfg.optim.lr}")
        lr_factor(cfg, 0)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self._validate()
        rank, world, device = self._setup_distributed()
        main = rank == 0
        run_dir = cfg.run_dir
        last_path, best_path = run_dir / "last.safetensors", run_dir / "best.safetensors"
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume and last_path.exists():
                raise RobustEdgeError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                                      f"another --name/--out-dir")
        if self.resume and not last_path.exists():
            raise RobustEdgeError(f"nothing to resume: {last_path} does not exist")

        data = load_dataset(cfg.data.name, cfg.data.root, image_size=cfg.data.image_size, channels=cfg.data.channels,
                            val_fraction=cfg.data.val_fraction, seed=cfg.data.seed, download=cfg.data.download and main)
        channels, size = data.input_shape[0], data.input_shape[1]
        spec = ModelSpec(cfg.model.arch, data.num_classes, channels, cfg.model.width, size, cfg.model.mean,
                         cfg.model.std)
        parts = build_parts(cfg, spec, device, world, data.num_classes)
        model, method, optimizer, scaler = parts.model, parts.method, parts.optimizer, parts.scaler
        method_cls = type(method)

        start_epoch, history, best = 0, [], float("-inf")
        if self.resume:
            weights, _, state = load_training_state(last_path)
            if state["config"]["model"] != config_to_dict(cfg)["model"] or state["config"]["method"] != cfg.method:
                raise RobustEdgeError(f"{last_path} was trained with a different model or method than this config")
            load_state_strict(model, weights, source=str(last_path), arch=spec.arch)
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            method.load_state_dict(state["method"])
            start_epoch, history, best = state["epoch"] + 1, state["history"], state["best_score"]
            if start_epoch >= cfg.epochs:
                raise RobustEdgeError(f"{last_path} already finished epoch {start_epoch}/{cfg.epochs}; "
                                      f"raise --epochs to train longer")

        student = parts.wrap(world, device)

        per_rank_batch = max(1, cfg.batch_size // world)
        loader = DeviceLoader(data.train, per_rank_batch, device=device, shuffle=True, augment=cfg.data.augment,
                              padding=cfg.data.padding, flip=cfg.data.flip, seed=cfg.seed, drop_last=False, rank=rank, world_size=world)
        val = data.val.take(cfg.eval_n)
        val_x, val_y = val.float_images(device), val.labels.to(device)
        meta = ModelMeta(spec, dataset=cfg.data.name, eps=cfg.eval_eps or cfg.attack.eps, method=cfg.method,
                         classes=data.classes,
                         extra={"data": {"root": cfg.data.root, "val_fraction": cfg.data.val_fraction,
                                         "seed": cfg.data.seed},
                                "config": config_to_dict(cfg)})
        if main:
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        writer = _tensorboard(run_dir) if main else None

        # adversarial methods keep the checkpoint with the best W-Robust, natural training the most accurate
        selection_key = "val_wrobust" if method_cls.adversarial else "val_clean"
        t_run = time.perf_counter()
        for epoch in range(start_epoch, cfg.epochs):
            row = self._train_epoch(epoch, student, parts, loader, device, rank, world, main)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                if main:
                    report = evaluate(unwrap(model), val_x, val_y, attacks=["clean", "pgd20"],
                                      eps=cfg.eval_eps or cfg.attack.eps, batch_size=256, seed=cfg.seed,
                                      show_progress=False, fold_bn=True)
                    row.update(val_clean=report.accuracy["clean"], val_pgd20=report.accuracy["pgd20"],
                               val_wrobust=report.w_robust("pgd20"))
            history.append(row)
            if main:
                score = row.get(selection_key, float("-inf"))
                if score > best:
                    best = score
                    meta.metrics = {k: row[k] for k in ("val_clean", "val_pgd20", "val_wrobust")} | {"epoch": epoch + 1}
                    save_model(best_path, model, meta)
                state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "method": method.state_dict(), "history": history, "best_score": best,
                         "config": config_to_dict(cfg)}
                save_training_state(last_path, model, meta, state)
                _write_csv(run_dir / "metrics.csv", history)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, epoch + 1)
                print(_epoch_line(cfg.name, row, cfg.epochs), flush=True)
            for callback in self.callbacks:
                callback(epoch, row)

        result = TrainResult(run_dir, best_path, last_path, history, best, time.perf_counter() - t_run, world)
        if world > 1:
            digests = [None] * world
            dist.all_gather_object(digests, state_digest(model))
            result.ranks_identical = len(set(digests)) == 1
        if main:
            atomic_write_json(run_dir / "result.json", {
                "best": str(best_path), "last": str(last_path), "selection": selection_key, "best_score": best, "seconds": result.seconds,
                "world_size": world, "ranks_identical": result.ranks_identical, "final_digest": state_digest(model),
                "history": history})
        if writer is not None:
            writer.close()
        if world > 1:
            dist.barrier()
        return result

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch, student, parts: "TrainingParts", loader, device, rank, world, main) -> dict:
        cfg = self.cfg
        model, method, optimizer = parts.model, parts.method, parts.optimizer
        lr = cfg.optim.lr * lr_factor(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.set_epoch(epoch)
        loader.set_epoch(epoch)
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)  # attack starts: see module docstring
        student.train()
        sums = torch.zeros(3, device=device)  # loss, train accuracy, grad norm
        extra: dict[str, torch.Tensor] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        bar = progress(loader, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}", total=len(loader),
                       enabled=cfg.progress and main)
        for x, y in bar:
            logs, grad_norm = parts.step(student, x, y)
            sums += torch.stack([logs["loss"].float(), logs["train_acc"].float(), grad_norm.float()])
            for key, value in logs.items():
                if key not in ("loss", "train_acc"):
                    extra[key] = extra.get(key, 0.0) + value.float()
            steps += 1
            seen += len(y)
            if steps % cfg.log_every == 0 or steps == len(loader):
                mean = (sums / steps).tolist()  # the only host sync of the loop
                if not math.isfinite(mean[0]):
                    raise RobustEdgeError(
                        f"loss became {mean[0]} in epoch {epoch + 1} (step {steps}); stopped. The last good "
                        f"checkpoint is {cfg.run_dir / 'last.safetensors'}; lower optim.lr or try amp off")
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{mean[0]:.4f}", acc=f"{mean[1]:.3f}",
                                    img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0
        totals = torch.cat([sums, torch.stack(list(extra.values())) if extra else sums[:0]])
        if world > 1:
            dist.all_reduce(totals)
            totals /= world
            # DDP syncs BN statistics at the start of each forward, so after the epoch's last one every
            # rank holds its own; take rank 0's so validation, checkpoints and all ranks agree
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        values = (totals / max(1, steps)).tolist()
        row = {"epoch": epoch + 1, "lr": lr, "loss": values[0], "train_acc": values[1], "grad_norm": values[2],
               "img_per_s": seen * world / seconds, "seconds": seconds}
        row.update({k: v for k, v in zip(extra, values[3:])})
        row.update(method.summary())
        return row


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

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def wrap(self, world: int = 1, device: torch.device | None = None) -> nn.Module:
        """The student as the step sees it: compiled if asked, under DDP with several ranks."""
        net = torch.compile(self.model) if self.cfg.compile else self.model
        if world > 1:
            device = device or self.device
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        return net

    def step(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """One optimisation step; returns the method's logs and the gradient norm as device tensors."""
        if self.cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None \
            else nullcontext()
        with autocast:
            loss, logs = self.method.step(student, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.params, float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step(logs)
        return logs, grad_norm


def build_parts(cfg: TrainConfig, spec: ModelSpec, device: torch.device, world: int = 1,
                num_classes: int | None = None) -> TrainingParts:
    """Student (seeded), teachers (folded, in their precision), method, optimiser and AMP scaler.

    With ``fold_attack`` the method attacks a linked conv+BN-folded twin of the student
    (models/folding.py), compiled along with the student when ``compile`` is set.
    """
    seed_everything(cfg.seed)
    model = spec.build().to(device)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method_cls = get_method(cfg.method)
    teachers = {role: load_teacher(cfg.teachers[role], num_classes or spec.num_classes, spec.in_channels,
                                   spec.image_size, device, cfg.data.name)
                for role in method_cls.teacher_roles if role in cfg.teachers}
    method = method_cls(cfg.method_args, cfg.attack, teachers, cfg.optim.milestones, cfg.optim.gamma, device)
    if cfg.fold_attack and method_cls.adversarial:
        from robustedge.models import fold_batchnorm

        twin = fold_batchnorm(model, linked=True)
        method.attack_twin = torch.compile(twin) if cfg.compile else twin
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    amp_dtype, use_scaler = _amp_settings(cfg, device)
    return TrainingParts(cfg, model, method, optimizer, torch.amp.GradScaler(device.type, enabled=use_scaler),
                         amp_dtype, device)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _write_csv(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def _epoch_line(name: str, row: dict, epochs: int) -> str:
    parts = [f"{name} epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"train acc {100 * row['train_acc']:.1f}%",
             f"{row['img_per_s']:.0f} img/s"]
    if "val_clean" in row:
        parts += [f"val clean {100 * row['val_clean']:.1f}%", f"val PGD-20 {100 * row['val_pgd20']:.1f}%"]
    for key in ("tau_adv", "tau_nat", "w_adv", "w_nat"):
        if key in row:
            parts.append(f"{key} {row[key]:.3f}")
    return " | ".join(parts)


def train(cfg: TrainConfig, *, resume: bool = False, callbacks: list[EpochCallback] | None = None) -> TrainResult:
    return Trainer(cfg, resume=resume, callbacks=callbacks).run()


__all__ = ["TrainResult", "Trainer", "TrainingParts", "build_parts", "lr_factor", "state_digest", "train"]
