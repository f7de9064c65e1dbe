"""The model registry: one name -> one constructor taking ``num_classes``, ``in_channels``, ``width``.

Every entry returns a :class:`~robustedge.models.base.Classifier` whose parameter names match the
community checkpoint the papers use, so published weights load with ``strict=True``.
"""

from __future__ import annotations

import re
from typing import Callable

from robustedge.errors import RobustEdgeError, unknown_name
from robustedge.models.base import Classifier
from robustedge.models.cifar_resnet import CifarResNet
from robustedge.models.dm_wideresnet import DMWideResNet
from robustedge.models.folding import fold_batchnorm, fold_if_possible
from robustedge.models.mobilenetv2 import MobileNetV2
from robustedge.models.resnet import PreActResNet, ResNet
from robustedge.models.wideresnet import WideResNet

Builder = Callable[..., Classifier]

MODELS: dict[str, Builder] = {
    "resnet18": lambda **kw: ResNet([2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: ResNet([3, 4, 6, 3], **kw),
    "preact_resnet18": lambda **kw: PreActResNet([2, 2, 2, 2], **kw),
    "mobilenetv2": lambda **kw: MobileNetV2(**kw),
    "wrn34_10": lambda **kw: WideResNet(34, 10, **kw),
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
}

# name patterns: any depth and widen factor of the two WideResNet layouts
PATTERNS: dict[str, tuple[re.Pattern, Callable[..., Classifier]]] = {
    "wideresnet-<depth>-<widen>": (re.compile(r"^wideresnet[-_]?(\d+)[-_](\d+)$"), WideResNet),  # TRADES layout
    "dm-wideresnet-<depth>-<widen>": (re.compile(r"^dm[-_]wideresnet[-_]?(\d+)[-_](\d+)$"), DMWideResNet),  # DeepMind's
}


def _pattern(name: str) -> tuple[Callable[..., Classifier], int, int] | None:
    for regex, cls in PATTERNS.values():
        match = regex.match(str(name))
        if match:
            return cls, int(match.group(1)), int(match.group(2))
    return None


def model_names() -> list[str]:
    return sorted(MODELS) + list(PATTERNS)


def check_arch(name: str) -> str:
    """``name`` if the registry can build it, else a one-line error listing the valid names."""
    if name not in MODELS and _pattern(name) is None:
        raise unknown_name("model", str(name), model_names())
    return name


def stem_stride(image_size: int) -> int:
    """The stem's stride for square inputs of ``image_size``: 1 up to 63 pixels (the CIFAR
    layout, and digits at 8x8), ``image_size // 32`` above, so the first stage always works on
    about a 32x32 grid: Tiny-ImageNet's 64x64 costs what CIFAR costs, as in the ARD/RSLAD
    Tiny-ImageNet setups. Parameter shapes do not change, so weights load across sizes."""
    return 1 if image_size < 64 else image_size // 32


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                normalization: tuple[list[float], list[float]] | None = None, image_size: int = 32) -> Classifier:
    """Build a registry model; ``wideresnet-28-10`` / ``dm-wideresnet-70-16`` style names give any
    WideResNet in the TRADES / DeepMind layout.

    ``image_size`` adapts the stem (see :func:`stem_stride`)."""
    if num_classes < 2:
        raise RobustEdgeError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise RobustEdgeError(f"in_channels must be >= 1, got {in_channels}")
    if not width > 0:
        raise RobustEdgeError(f"width multiplier must be > 0, got {width}")
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, width=width)
    pattern = _pattern(name)
    try:
        if name in MODELS:
            model = MODELS[name](**kwargs)
        elif pattern is not None:
            cls, depth, widen = pattern
            model = cls(depth, widen, **kwargs)
        else:
            raise unknown_name("model", name, model_names())
    except ValueError as exc:
        raise RobustEdgeError(f"cannot build model '{name}': {exc}") from None
    if image_size < 1:
        raise RobustEdgeError(f"image_size must be >= 1, got {image_size}")
    stride = stem_stride(image_size)
    if stride > 1:
        model.conv1.stride = (stride, stride)
    if normalization is not None:
        model.set_normalization(*normalization)
    return model


__all__ = ["Classifier", "DMWideResNet", "MODELS", "PATTERNS", "build_model", "check_arch", "fold_batchnorm", "fold_if_possible", "model_names", "stem_stride"]
