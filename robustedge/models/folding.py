"""Conv + BatchNorm folding for inference.

A model in eval mode computes BN as a per-channel affine map, which can be folded into the
preceding convolution's weights: the same function up to float rounding (about 1e-6 on logits),
with a third fewer operations. On a 2-core CPU that makes the forward+backward passes attacks are
made of about 1.5x faster for MobileNetV2. Pre-activation BNs (applied before a convolution, as in
PreActResNet) cannot be folded and are kept.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from robustedge.models.base import Classifier


class _Body(nn.Module):
    """The part of a classifier after input normalisation (what torch.fx can trace)."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features_to_logits(x)


class FoldedClassifier(nn.Module):
    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("input_mean", mean.clone(), persistent=False)
        self.register_buffer("input_std", std.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_mean.numel():
            x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        return self.body(x)


def fold_batchnorm(model: Classifier) -> FoldedClassifier:
    """An eval-only copy of ``model`` with every conv -> BN pair folded into one conv."""
    from torch.fx.experimental.optimization import fuse

    source = copy.deepcopy(model).eval()
    body = fuse(_Body(source), inplace=True)
    for p in body.parameters():
        p.requires_grad_(False)
    return FoldedClassifier(body, model.input_mean, model.input_std).eval()
