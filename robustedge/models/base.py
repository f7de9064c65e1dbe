"""What every RobustEdge network shares: [0, 1] inputs with normalisation inside the model.

Attacks, exports and the demo all work in pixel space, so a model that was trained on normalised
inputs carries its mean/std as (non-persistent) buffers and normalises in ``forward``. Keeping them
out of the state dict is what lets community checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count under a width multiplier (at least 1), so small CPU runs keep the topology."""
    return max(1, int(round(channels * width)))


class Classifier(nn.Module):
    """Base for the zoo: subclasses implement ``features_to_logits`` on normalised inputs.

    Activations that follow a conv + BN are ``nn.ReLU`` modules, one per call site, not ``F.relu``:
    the quantizers of the QAT / PT2E flow (robustedge/qat.py) recognise conv-bn-relu by module, and
    only then quantise after the ReLU alone, as the INT8 runtimes fuse it (with ``F.relu`` the output
    was quantised twice, before and after the ReLU, and ONNX Runtime's fused kernels then disagreed with
    the simulated function on 3.5% of inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(0), persistent=False)
        self.register_buffer("input_std", torch.zeros(0), persistent=False)

    def set_normalization(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> "Classifier":
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together")
        device = next(self.parameters()).device
        if mean is None:
            self.input_mean = torch.zeros(0, device=device)
            self.input_std = torch.zeros(0, device=device)
        else:
            if any(s <= 0 for s in std):
                raise ValueError(f"normalisation std must be positive, got {list(std)}")
            self.input_mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.input_std = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return self

    @property
    def normalization(self) -> tuple[list[float], list[float]] | None:
        if self.input_mean.numel() == 0:
            return None
        return self.input_mean.flatten().tolist(), self.input_std.flatten().tolist()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean.numel():
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        return self.features_to_logits(x)

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
