"""Teachers: frozen models that only infer, from a RobustEdge file, foreign weights or RobustBench."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustedge.errors import RobustEdgeError


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype a teacher runs in; ``auto`` is bf16 where the hardware computes it natively
    (CUDA with bf16, CPUs with AVX512-BF16/AMX through oneDNN) and fp32 elsewhere."""
    if precision == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and torch.backends.mkldnn.is_available() and \
                bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    if precision not in _PRECISIONS:
        raise RobustEdgeError(f"unknown teacher precision '{precision}'; valid: auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


class FrozenTeacher(nn.Module):
    """A teacher that only infers: eval mode forever, no parameter gradients, under inference
    mode, optionally in a lower precision than the student; always returns fp32 logits.

    Its soft labels only enter the loss as constants, so bf16 (8 bits of mantissa) changes a target
    probability by well under 1%; the benchmark (bench/train_step.py) checks the step's loss stays
    within tolerance of an fp32 teacher's.
    """

    def __init__(self, model: nn.Module, precision: str = "fp32", device: torch.device | str = "cpu",
                 channels_last: bool = False) -> None:
        super().__init__()
        self.dtype = teacher_dtype(precision, device)
        self.model = model.to(device=device, dtype=self.dtype).eval()
        if channels_last:  # the teachers are most of a distillation step's FLOPs: the fast layout too
            self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":  # a teacher never leaves eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(x.detach().to(self.dtype)).float()
        # inference tensors cannot be saved for backward; the KL terms save their target
        return logits.clone()


def load_teacher(cfg: Any, num_classes: int, in_channels: int, image_size: int,
                 device: torch.device | str = "cpu", dataset: str | None = None,
                 channels_last: bool = False) -> FrozenTeacher:
    """A teacher from any source :func:`robustedge.loading.load` takes: a RobustEdge model file, foreign
    weights plus a registry ``arch``, or ``robustbench:<name>`` (the ``zoo`` extra) of ``dataset``."""
    from robustedge.loading import ModelFacts, load
    from robustedge.models import fold_if_possible

    if not cfg.checkpoint:
        raise RobustEdgeError("a teacher needs 'checkpoint' (a model file or robustbench:<name>)")
    facts = ModelFacts(cfg.arch, num_classes, in_channels, image_size, cfg.width, cfg.mean, cfg.std, dataset)
    model, meta = load(cfg.checkpoint, facts=facts, device=device)
    spec = meta.spec
    if spec.num_classes != num_classes or spec.in_channels != in_channels:
        raise RobustEdgeError(f"teacher {cfg.checkpoint} is {spec.arch} with {spec.num_classes} classes and "
                              f"{spec.in_channels} input channels; the data has {num_classes} and {in_channels}")
    # a teacher only infers: a registry model's BNs are folded once, here (models/folding.py)
    return FrozenTeacher(fold_if_possible(model), cfg.precision, device, channels_last)
