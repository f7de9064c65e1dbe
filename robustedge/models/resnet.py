"""CIFAR-style ResNet-18/34 and PreActResNet-18.

Parameter names follow kuangliu/pytorch-cifar (the ResNet-18 used by ARD, RSLAD, MTARD and shipped
by pyautoattack as ``examples/model_test.pt``), so those checkpoints load with ``strict=True``.
The fixed ``avg_pool2d(out, 4)`` of the original is an adaptive pool here: identical at 32x32,
and it also serves 16x16 digits and 64x64 Tiny-ImageNet inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustedge.models.base import Classifier, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # modules, one per call site: see models/base.py
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


def _make_stage(block: type[nn.Module], in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for s in [stride] + [1] * (blocks - 1):
        layers.append(block(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*layers)


class ResNet(Classifier):
    def __init__(self, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled(v, width) for v in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.layer1 = _make_stage(BasicBlock, c[0], c[0], num_blocks[0], 1)
        self.layer2 = _make_stage(BasicBlock, c[0], c[1], num_blocks[1], 2)
        self.layer3 = _make_stage(BasicBlock, c[1], c[2], num_blocks[2], 2)
        self.layer4 = _make_stage(BasicBlock, c[2], c[3], num_blocks[3], 2)
        self.linear = nn.Linear(c[3], num_classes)
        self.relu = nn.ReLU()

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActResNet(Classifier):
    """PreActResNet-18 with the final BN + ReLU of the robust-training codebases (Rice et al.,
    Wong et al., RobustBench); kuangliu's original omits it. Our choice: follow the robust ones."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [scaled(v, width) for v in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.layer1 = _make_stage(PreActBlock, c[0], c[0], num_blocks[0], 1)
        self.layer2 = _make_stage(PreActBlock, c[0], c[1], num_blocks[1], 2)
        self.layer3 = _make_stage(PreActBlock, c[1], c[2], num_blocks[2], 2)
        self.layer4 = _make_stage(PreActBlock, c[2], c[3], num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(c[3])
        self.linear = nn.Linear(c[3], num_classes)

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
