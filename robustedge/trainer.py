"""The trainer: one loop for every method, on CPU, one GPU or many (torchrun + DDP).

What the trainer owns: optimiser and schedule, AMP, channels_last / torch.compile, the NaN guard,
validation (clean + PGD-20 on the held-out split) with ``last`` and ``best`` checkpoints,
per-epoch metrics (CSV, TensorBoard when installed), resume, DDP, and the run folder's lock (one run
writes a run folder at a time; see :meth:`Trainer._lock_run_dir`).

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

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from robustedge.checkpoint import ModelMeta, ModelSpec, read_meta, save_model, unwrap
from robustedge.files import (FolderLock, atomic_write_json, atomic_write_text, check_writable_folder,
                              clean_stale_temps, lock_folder)
from robustedge.training_state import load_training_state, save_training_state
from robustedge.weights import load_state_strict
from robustedge.config import DataConfig, TrainConfig, config_to_dict, dump_config, validate_config
from robustedge.data import DeviceLoader, calibration_images, load_dataset
from robustedge.errors import Diverged, RobustEdgeError
from robustedge.suite import evaluate
from robustedge.methods import get_method
from robustedge.runtime import progress, resolve_device
from robustedge.seeds import attack_seed
from robustedge.training_log import epoch_line, tensorboard_writer, write_metrics_csv
from robustedge.training_parts import TrainingParts, build_parts

EpochCallback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_path: Path | None  # None when validation is off (eval_n = 0): nothing selects a best
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


def state_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer: equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    for key, value in unwrap(model).state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Run:
    """What a run carries from its set-up through its epochs to its end."""

    rank: int
    world: int
    device: torch.device
    parts: "TrainingParts"
    student: nn.Module
    loader: DeviceLoader
    meta: ModelMeta
    val_x: torch.Tensor
    val_y: torch.Tensor
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float = float("-inf")
    best_written: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, callbacks: list[EpochCallback] | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.callbacks = list(callbacks or [])
        self.writer = None  # TensorBoard, on the main rank when installed

    @property
    def last_path(self) -> Path:
        return self.cfg.run_dir / "last.safetensors"

    @property
    def best_path(self) -> Path:
        return self.cfg.run_dir / "best.safetensors"

    @property
    def validates(self) -> bool:
        """Validation runs unless ``eval_n`` is 0; without it there is no best.safetensors."""
        return self.cfg.eval_n > 0

    # ------------------------------------------------------------------------------------------
    def _setup_distributed(self) -> tuple[int, int, torch.device]:
        from robustedge.sharding import init_from_env, launched_by_torchrun

        # a group this run creates is this run's to destroy (a caller's own group is left alone)
        self.owns_group = launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
        world, device = init_from_env(resolve_device(self.cfg.device))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
        return world.rank, world.size, device

    def _check_run_dir(self) -> None:
        """Before anything is written: the run folder is new, or this is a resume of it."""
        cfg = self.cfg
        check_writable_folder(Path(cfg.out_dir), "--out-dir")
        check_writable_folder(cfg.run_dir, "run folder")
        if not self.resume and self.last_path.exists():
            raise RobustEdgeError(f"{cfg.run_dir} already holds a run; pass --resume to continue it or choose "
                                  f"another --name/--out-dir")
        if self.resume and not self.last_path.exists():
            raise RobustEdgeError(f"nothing to resume: {self.last_path} does not exist")
        if self.resume and cfg.qat.enabled:
            from robustedge.qat import PATTERNS, saved_scheme

            _, patterns = saved_scheme(read_meta(self.last_path).extra.get("qat"), str(self.last_path))
            if patterns != PATTERNS.get(cfg.qat.activations):
                raise RobustEdgeError(f"{self.last_path} was trained with its quantisers at '{patterns}' places "
                                      f"(an earlier RobustEdge); this version trains {cfg.qat.activations} QAT "
                                      f"with '{PATTERNS.get(cfg.qat.activations)}' ones and cannot resume it: start "
                                      f"the fine-tune afresh under another --name")

    def _lock_run_dir(self) -> FolderLock | None:
        """Hold the run folder for this run (rank 0 of a DDP group only: the ranks are one run).

        Two runs with the same ``--name`` started together would both pass :meth:`_check_run_dir`
        (neither has written ``last.safetensors`` yet), both train and both exit 0, one silently
        replacing the other's checkpoints. With the lock the second is refused in one line before it
        writes anything; a lock left by a killed run is taken over. Then the temporaries that writers
        killed in this folder left behind are removed.
        """
        if _launch_rank() != 0:
            return None
        check_writable_folder(Path(self.cfg.out_dir), "--out-dir")
        check_writable_folder(self.cfg.run_dir, "run folder")
        lock = lock_folder(self.cfg.run_dir, what="run folder")
        clean_stale_temps(self.cfg.run_dir)
        return lock

    def run(self) -> TrainResult:
        from robustedge.sharding import leave

        validate_config(self.cfg)
        lock = self._lock_run_dir()
        self.owns_group = False
        finished = False
        try:
            self._check_run_dir()  # under the lock: no other run can write last.safetensors meanwhile
            run = self._prepare()
            t_run = time.perf_counter()
            for epoch in range(run.start_epoch, self.cfg.epochs):
                self._epoch(epoch, run)
            result = self._finish(run, time.perf_counter() - t_run)
            finished = True
            return result
        finally:
            try:
                if self.owns_group:
                    leave(wait=finished)  # after an error the other ranks may never reach a barrier
            finally:
                if lock is not None:
                    lock.release()

    def _prepare(self) -> _Run:
        """Data, parts, the resumed state and the metadata every checkpoint carries."""
        cfg = self.cfg
        from robustedge.sharding import World, rank_zero_first

        rank, world, device = self._setup_distributed()
        with rank_zero_first(World(rank, world)):  # rank 0 downloads; the others read its files after it
            data = load_dataset(cfg.data.name, cfg.data.root, image_size=cfg.data.image_size,
                                channels=cfg.data.channels, val_fraction=cfg.data.val_fraction, seed=cfg.data.seed,
                                download=cfg.data.download and rank == 0)
        if self.validates and len(data.val) == 0:
            raise RobustEdgeError(f"validation needs examples but the validation split is empty "
                                  f"(data.val_fraction {cfg.data.val_fraction}); raise it or set eval_n: 0")
        channels, size = data.input_shape[0], data.input_shape[1]
        spec = ModelSpec(cfg.model.arch, data.num_classes, channels, cfg.model.width, size, cfg.model.mean,
                         cfg.model.std)
        with rank_zero_first(World(rank, world)):  # teachers from RobustBench: one rank fills the cache
            parts = build_parts(cfg, spec, device, world, data.num_classes)
        val = data.val.take(cfg.eval_n)
        meta = ModelMeta(spec, dataset=cfg.data.name, eps=cfg.eval_eps if cfg.eval_eps is not None else cfg.attack.eps,
                         method=cfg.method, classes=data.classes,
                         extra={"data": {"root": cfg.data.root, "val_fraction": cfg.data.val_fraction,
                                         "seed": cfg.data.seed, "train_n": cfg.data.train_n},
                                "config": config_to_dict(cfg)})
        train_split = data.train.subset(cfg.data.train_n, cfg.data.seed)
        if len(train_split) < len(data.train) and rank == 0:
            print(f"{cfg.name}: training on {len(train_split)} of the {len(data.train)} training images "
                  f"(data.train_n)", flush=True)
        loader = DeviceLoader(train_split, max(1, cfg.batch_size // world), device=device, shuffle=True,
                              augment=cfg.data.augment, padding=cfg.data.padding, flip=cfg.data.flip, seed=cfg.seed,
                              drop_last=False, rank=rank, world_size=world)
        run = _Run(rank, world, device, parts, parts.model, loader, meta, val.float_images(device),
                   val.labels.to(device))
        if cfg.qat.enabled:
            from robustedge.qat import calibrate, library_version

            meta.extra["qat"] = {"activations": cfg.qat.activations, "patterns": unwrap(parts.model).patterns,
                                 "library": library_version(), "from_checkpoint": cfg.qat.from_checkpoint}
            if cfg.qat.from_checkpoint and cfg.qat.calibration_n and not self.resume:
                calibrate(parts.model, calibration_images(train_split, cfg.qat.calibration_n, cfg.seed, device))
        if cfg.qat.carry_method_state and not self.resume:  # a fine-tune, under QAT or its float control
            parts.method.load_state_dict(float_method_state(cfg.qat.from_checkpoint, cfg.method))
        if self.resume:
            self._restore(run, spec)
        run.student = parts.wrap(world, device)
        if run.main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg.run_dir / "config.yaml", dump_config(cfg))
        self.writer = tensorboard_writer(cfg.run_dir) if run.main else None
        return run

    def _restore(self, run: _Run, spec: ModelSpec) -> None:
        cfg, parts = self.cfg, run.parts
        weights, _, state = load_training_state(self.last_path)
        if state.get("config", {}).get("model") != config_to_dict(cfg)["model"] or \
                state.get("config", {}).get("method") != cfg.method:
            raise RobustEdgeError(f"{self.last_path} was trained with a different model or method than this config")
        saved_data, data = state.get("config", {}).get("data", {}), config_to_dict(cfg)["data"]
        for key in ("train_n", "seed", "val_fraction"):  # which images it trains on (a file before train_n: all)
            if saved_data.get(key, getattr(DataConfig(), key)) != data[key]:
                raise RobustEdgeError(f"{self.last_path} was trained with data.{key} {saved_data.get(key)!r}, this "
                                      f"config has {data[key]!r}: resume with the run's own (--set data.{key}=...)")
        load_state_strict(parts.model, weights, source=str(self.last_path), arch=spec.arch)
        parts.optimizer.load_state_dict(state["optimizer"])
        parts.scaler.load_state_dict(state["scaler"])
        parts.method.load_state_dict(state["method"])
        run.start_epoch, run.history = state["epoch"] + 1, state["history"]
        run.best = float("-inf") if state.get("best_score") is None else state["best_score"]
        run.best_written = self.best_path.exists()
        if run.start_epoch >= cfg.epochs:
            raise RobustEdgeError(f"{self.last_path} already finished epoch {run.start_epoch}/{cfg.epochs}; "
                                  f"raise --epochs to train longer")

    def _epoch(self, epoch: int, run: _Run) -> None:
        """One epoch: train, validate, checkpoint, log."""
        cfg = self.cfg
        row = self._train_epoch(epoch, run)
        if self.validates and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs) and run.main:
            report = evaluate(unwrap(run.parts.model), run.val_x, run.val_y, attacks=["clean", "pgd20"],
                              eps=run.meta.eps, batch_size=256, seed=cfg.seed, show_progress=False, fold_bn=True)
            row.update(val_clean=report.accuracy["clean"], val_pgd20=report.accuracy["pgd20"],
                       val_wrobust=report.w_robust("pgd20"))
        run.history.append(row)
        if run.main:
            self._checkpoint(epoch, row, run)
        for callback in self.callbacks:
            callback(epoch, row)

    def _checkpoint(self, epoch: int, row: dict, run: _Run) -> None:
        cfg, parts = self.cfg, run.parts
        score = row.get(self._selection_key(), float("-inf"))
        if score > run.best:
            run.best = score
            run.meta.metrics = {k: row[k] for k in ("val_clean", "val_pgd20", "val_wrobust")} | {"epoch": epoch + 1}
            save_model(self.best_path, parts.model, run.meta)
            run.best_written = True
        state = {"epoch": epoch, "optimizer": parts.optimizer.state_dict(), "scaler": parts.scaler.state_dict(),
                 "method": parts.method.state_dict(), "history": run.history,
                 "best_score": run.best if run.best_written else None,
                 "config": config_to_dict(cfg)}
        save_training_state(self.last_path, parts.model, run.meta, state)
        write_metrics_csv(cfg.run_dir / "metrics.csv", run.history)
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key, value, epoch + 1)
        print(epoch_line(cfg.name, row, cfg.epochs, list(parts.method.summary())), flush=True)

    def _selection_key(self) -> str:
        """Adversarial methods keep the checkpoint with the best W-Robust, natural training the most accurate."""
        return "val_wrobust" if get_method(self.cfg.method).adversarial else "val_clean"

    def _finish(self, run: _Run, seconds: float) -> TrainResult:
        cfg = self.cfg
        best_path = self.best_path if run.best_written else None
        result = TrainResult(cfg.run_dir, best_path, self.last_path, run.history, run.best, seconds, run.world)
        if run.world > 1:
            digests = [None] * run.world
            dist.all_gather_object(digests, state_digest(run.parts.model))
            result.ranks_identical = len(set(digests)) == 1
        if run.main:
            atomic_write_json(cfg.run_dir / "result.json", {
                "best": str(best_path) if best_path else None, "last": str(self.last_path),
                "selection": self._selection_key() if self.validates else "none (eval_n = 0: no validation)",
                "best_score": run.best if run.best_written else None, "seconds": seconds,
                "world_size": run.world, "ranks_identical": result.ranks_identical,
                "final_digest": state_digest(run.parts.model), "history": run.history})
        if self.writer is not None:
            self.writer.close()
        if run.world > 1:
            dist.barrier()
        return result

    # ------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, run: _Run) -> dict:
        cfg, parts = self.cfg, run.parts
        method, optimizer = parts.method, parts.optimizer
        lr = cfg.optim.lr * lr_factor(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.set_epoch(epoch)
        if cfg.qat.enabled and epoch >= cfg.epochs - cfg.qat.freeze_epochs:
            unwrap(run.parts.model).freeze()  # the last epochs train against the shipped scales and BN statistics
        run.loader.set_epoch(epoch)
        torch.manual_seed(attack_seed(cfg.seed, epoch, run.rank))  # attack starts: see module docstring
        run.student.train()
        sums = torch.zeros(4, device=run.device)  # loss, train accuracy, grad norm (finite steps), finite steps
        extra: dict[str, torch.Tensor] = {}
        steps, seen, t0 = 0, 0, time.perf_counter()
        total = len(run.loader)
        bar = progress(run.loader, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.epochs}", total=total,
                       enabled=cfg.progress and run.main)
        for x, y in bar:
            try:
                logs, grad_norm = parts.step(run.student, x, y)
            except Diverged as exc:  # noticed inside the step (a QAT observer), before the loss below
                raise self._stopped(str(exc), epoch, steps + 1) from None
            finite = torch.isfinite(grad_norm)  # an fp16 scaler skips steps with inf gradients
            sums += torch.stack([logs["loss"].float(), logs["train_acc"].float(),
                                 torch.where(finite, grad_norm.float(), 0.0), finite.float()])
            for key, value in logs.items():
                if key not in ("loss", "train_acc"):
                    extra[key] = extra.get(key, 0.0) + value.float()
            steps += 1
            seen += len(y)
            if steps % cfg.log_every == 0 or steps == total:
                mean = (sums / steps).tolist()  # the only host sync of the loop
                if run.world > 1:  # a NaN on one rank stops every rank (the others would wait in a collective)
                    bad = torch.tensor([0.0 if math.isfinite(mean[0]) else 1.0], device=run.device)
                    dist.all_reduce(bad)
                    if bad.item() and math.isfinite(mean[0]):
                        mean[0] = float("nan")
                if not math.isfinite(mean[0]):
                    raise self._stopped(f"loss became {mean[0]}", epoch, steps)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{mean[0]:.4f}", acc=f"{mean[1]:.3f}",
                                    img_s=f"{seen * run.world / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0
        totals = torch.cat([sums, torch.stack(list(extra.values())) if extra else sums[:0]])
        if run.world > 1:
            dist.all_reduce(totals)
            totals /= run.world
            # DDP syncs BN statistics at the start of each forward, so after the epoch's last one every
            # rank holds its own; take rank 0's so validation, checkpoints and all ranks agree
            for buffer in parts.model.buffers():
                dist.broadcast(buffer, src=0)
        values = totals.tolist()
        row = {"epoch": epoch + 1, "lr": lr, "loss": values[0] / steps, "train_acc": values[1] / steps,
               "grad_norm": values[2] / max(values[3], 1.0), "img_per_s": seen * run.world / seconds,
               "seconds": seconds}
        row.update({k: v / steps for k, v in zip(extra, values[4:])})
        row.update(method.summary())
        return row

    def _stopped(self, what: str, epoch: int, step: int) -> RobustEdgeError:
        """The one line a diverged run stops with, whichever check saw the NaN first."""
        last_good = f"The last good checkpoint is {self.last_path}" if self.last_path.exists() else \
            "No checkpoint was written yet (this was the first epoch)"
        return RobustEdgeError(f"{what} in epoch {epoch + 1} (step {step}): training diverged; stopped. {last_good}; "
                               f"lower optim.lr or try amp off")


def _launch_rank() -> int:
    """This process's rank, known before the process group is joined (torchrun's RANK), 0 alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    from robustedge.sharding import launched_by_torchrun

    if not launched_by_torchrun():
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise RobustEdgeError(f"RANK={os.environ['RANK']!r} is not an integer; start DDP runs with torchrun") from None


def float_method_state(checkpoint: str | os.PathLike, method: str) -> dict:
    """The method state (B-MTARD's temperatures, loss weights, first losses) the float run of ``checkpoint``
    ended with: its ``last.safetensors``, beside the checkpoint. A QAT fine-tune that starts from it goes on
    balancing where the float run had converged instead of from the method's initial values."""
    last = Path(checkpoint).parent / "last.safetensors"
    if not last.is_file():
        raise RobustEdgeError(f"qat.carry_method_state needs the float run's training state {last} (the run folder "
                              f"of {checkpoint}); copy it beside the checkpoint or set carry_method_state: false")
    _, _, state = load_training_state(last)
    if state.get("config", {}).get("method") != method:
        raise RobustEdgeError(f"{last} was trained with method '{state.get('config', {}).get('method')}', this run "
                              f"with '{method}': there is no method state to carry")
    return state["method"]


def train(cfg: TrainConfig, *, resume: bool = False, callbacks: list[EpochCallback] | None = None) -> TrainResult:
    return Trainer(cfg, resume=resume, callbacks=callbacks).run()


__all__ = ["TrainResult", "Trainer", "float_method_state", "lr_factor", "state_digest", "train"]
