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
from robustedge.models.folding import fold_batchnorm
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

_WIDERESNET = re.compile(r"^wideresnet[-_]?(\d+)[-_](\d+)$")


def model_names() -> list[str]:
    return sorted(MODELS) + ["wideresnet-<depth>-<widen>"]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                normalization: tuple[list[float], list[float]] | None = None) -> Classifier:
    """Build a registry model; ``wideresnet-28-10`` style names give any WideResNet."""
    if num_classes < 2:
        raise RobustEdgeError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise RobustEdgeError(f"in_channels must be >= 1, got {in_channels}")
    if not width > 0:
        raise RobustEdgeError(f"width multiplier must be > 0, got {width}")
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, width=width)
    match = _WIDERESNET.match(name)
    try:
        if name in MODELS:
            model = MODELS[name](**kwargs)
        elif match:
            model = WideResNet(int(match.group(1)), int(match.group(2)), **kwargs)
        else:
            raise unknown_name("model", name, model_names())
    except ValueError as exc:
        raise RobustEdgeError(f"cannot build model '{name}': {exc}") from None
    if normalization is not None:
        model.set_normalization(*normalization)
    return model


__all__ = ["Classifier", "MODELS", "build_model", "fold_batchnorm", "model_names"]
