"""The training-method registry. A method is one module in this package defining a ``Method``
subclass decorated with :func:`register` (registered under its ``name``); every module here but the
shared ``base`` and ``losses`` is imported on first use. A user's own method is added with
:func:`robustedge.register_method`."""

from __future__ import annotations

import importlib
import pkgutil

from robustedge.methods.base import Method
from robustedge.registry import Registry

_SHARED = ("base", "losses")  # modules every method imports; they register nothing


def _discover() -> None:
    """Import every method module once (importing one directly must not hide the others); the
    registry calls this before its first lookup."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


METHODS: Registry[type[Method]] = Registry("method", loader=_discover)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    return METHODS.register(cls.name, cls)


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def method_names() -> list[str]:
    return sorted(METHODS)


__all__ = ["METHODS", "Method", "get_method", "method_names", "register"]
