"""MobileNetV2 for 32x32 inputs, parameter names as kuangliu/pytorch-cifar (the RSLAD/MTARD student).

CIFAR changes of the original kept: stride 1 in the stem and in the second stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustedge.models.base import Classifier, scaled

# (expansion, out_planes, num_blocks, stride)
CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class Block(nn.Module):
    """Inverted residual: expand (1x1) + depthwise (3x3) + project (1x1)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()  # modules, one per call site: see models/base.py
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, 1, 0, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(Classifier):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(32, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers, in_planes = [], stem
        for expansion, out_planes, num_blocks, stride in CFG:
            out_planes = scaled(out_planes, width)
            for s in [stride] + [1] * (num_blocks - 1):
                layers.append(Block(in_planes, out_planes, expansion, s))
                in_planes = out_planes
        self.layers = nn.Sequential(*layers)
        head = scaled(1280, width)
        self.conv2 = nn.Conv2d(in_planes, head, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.linear = nn.Linear(head, num_classes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def features_to_logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
