"""WideResNet in DeepMind's layout (Gowal et al. 2020, "Uncovering the limits of adversarial
training"): the CIFAR-100 robust teacher of RSLAD, MTARD and B-MTARD (WRN-70-16, Swish), whose
released code loads DeepMind's ``cifar100_linf_wrn70-16_without.pt``; RobustBench's
``DMWideResNet`` is the same network.

Parameter names follow that checkpoint (``init_conv``, ``layer.<g>.block.<b>.batchnorm_0`` ...,
``batchnorm``, ``logits``) so it loads with ``strict=True``. Differences from the published module,
none of which changes the function: Swish is ``nn.SiLU`` (x * sigmoid(x), the same values and
gradient as the custom autograd function there); normalisation is the zoo's ``set_normalization``
(the released files pass their mean/std to the constructor: the recipes carry those values); the
stem of inputs of 64 pixels and more gets the zoo's stride (``stem_stride``), like every model here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustedge.models.base import Classifier, scaled


class Block(nn.Module):
    """Pre-activation block; the 3x3 convolution pads by hand to TensorFlow's 'SAME'."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = nn.SiLU()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if in_planes != out_planes else None
        self.pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu_0(self.batchnorm_0(x))
        if self.shortcut is not None:  # the shortcut starts from the activated input there
            x = activated
        out = self.conv_0(F.pad(activated, self.pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(x) if self.shortcut is not None else x) + out


class BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*[Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                                     for i in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(Classifier):
    def __init__(self, depth: int = 70, widen_factor: int = 16, num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [scaled(16, width), scaled(16 * widen_factor, width), scaled(32 * widen_factor, width),
              scaled(64 * widen_factor, width)]
        self.init_conv = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(BlockGroup(n, ch[0], ch[1], 1), BlockGroup(n, ch[1], ch[2], 2),
                                   BlockGroup(n, ch[2], ch[3], 2))
        self.batchnorm = nn.BatchNorm2d(ch[3])
        self.relu = nn.SiLU()
        self.logits = nn.Linear(ch[3], num_classes)

    @property
    def conv1(self) -> nn.Conv2d:
        """The stem, under the name the zoo's stem-stride rule uses (models.build_model)."""
        return self.init_conv

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.batchnorm(self.layer(self.init_conv(x))))
        return self.logits(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
