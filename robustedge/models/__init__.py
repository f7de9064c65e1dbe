"""The model registry: one name -> one builder taking ``num_classes``, ``in_channels``, ``width``.

Every built-in entry returns a :class:`~robustedge.models.base.Classifier` whose parameter names match
the community checkpoint the papers use, so published weights load with ``strict=True``. A user's own
builder is added with :func:`robustedge.register_model` (docs/design/extending.md, "Your own model, dataset or
method") and must return a ``Classifier`` too.
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from robustedge.errors import RobustEdgeError
from robustedge.models.base import Classifier
from robustedge.models.cifar_resnet import CifarResNet
from robustedge.models.dm_wideresnet import DMWideResNet
from robustedge.models.folding import fold_batchnorm, fold_if_possible
from robustedge.models.mobilenetv2 import MobileNetV2
from robustedge.models.resnet import PreActResNet, ResNet
from robustedge.models.wideresnet import WideResNet
from robustedge.registry import Registry

Builder = Callable[..., Classifier]

MODELS: Registry[Builder] = Registry("model", {
    "resnet18": lambda **kw: ResNet([2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: ResNet([3, 4, 6, 3], **kw),
    "preact_resnet18": lambda **kw: PreActResNet([2, 2, 2, 2], **kw),
    "mobilenetv2": lambda **kw: MobileNetV2(**kw),
    "wrn34_10": lambda **kw: WideResNet(34, 10, **kw),
    "resnet20": lambda **kw: CifarResNet(20, **kw),
    "resnet56": lambda **kw: CifarResNet(56, **kw),
})

# name patterns: any depth and widen factor of the two WideResNet layouts
PATTERNS: dict[str, tuple[re.Pattern, Callable[..., Classifier]]] = {
    "wideresnet-<depth>-<widen>": (re.compile(r"^wideresnet[-_]?(\d+)[-_](\d+)$"), WideResNet),  # TRADES layout
    "dm-wideresnet-<depth>-<widen>": (re.compile(r"^dm[-_]wideresnet[-_]?(\d+)[-_](\d+)$"), DMWideResNet),  # DeepMind's
}


def _depth_widen(cls: Callable[..., Classifier]) -> Callable[[re.Match], Builder]:
    """The builder a pattern name resolves to: ``cls(depth, widen, **kw)`` from the name's two numbers."""
    return lambda match: lambda **kw: cls(int(match.group(1)), int(match.group(2)), **kw)


for _template, (_regex, _cls) in PATTERNS.items():
    MODELS.register_pattern(_template, _regex.pattern, _depth_widen(_cls))


def model_names() -> list[str]:
    """The registered names, sorted, then the pattern templates (``wideresnet-<depth>-<widen>``)."""
    registered = sorted(MODELS)
    return registered + [n for n in MODELS.names() if n not in set(registered)]


def check_arch(name: str) -> str:
    """``name`` if the registry can build it, else a one-line error listing the valid names."""
    MODELS.get(name)
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
    builder = MODELS.get(name)  # an unknown name: the one-line error listing the valid ones
    try:
        model = builder(**kwargs)
    except ValueError as exc:
        raise RobustEdgeError(f"cannot build model '{name}': {exc}") from None
    if not isinstance(model, Classifier):
        raise RobustEdgeError(f"model '{name}' was built as a {type(model).__name__}, not a robustedge.models.Classifier "
                              f"(subclass Classifier and put the network in features_to_logits)")
    if image_size < 1:
        raise RobustEdgeError(f"image_size must be >= 1, got {image_size}")
    stride = stem_stride(image_size)
    if stride > 1 and isinstance(getattr(model, "conv1", None), nn.Conv2d):  # every built-in model has one
        model.conv1.stride = (stride, stride)
    if normalization is not None:
        model.set_normalization(*normalization)
    return model


__all__ = ["Classifier", "DMWideResNet", "MODELS", "PATTERNS", "build_model", "check_arch", "fold_batchnorm", "fold_if_possible", "model_names", "stem_stride"]
