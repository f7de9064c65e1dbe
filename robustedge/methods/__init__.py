"""The training-method registry. A method is one module in this package defining a ``Method``
subclass decorated with :func:`register`; every module here but the shared ``base`` and ``losses``
is imported on first use."""

from __future__ import annotations

import importlib
import pkgutil

from robustedge.errors import unknown_name
from robustedge.methods.base import Method

METHODS: dict[str, type[Method]] = {}
_discovered = False
_SHARED = ("base", "losses")  # modules every method imports; they register nothing


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every method module once (importing one directly must not hide the others)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> type[Method]:
    _discover()
    if name not in METHODS:
        raise unknown_name("method", name, list(METHODS))
    return METHODS[name]


def method_names() -> list[str]:
    _discover()
    return sorted(METHODS)


__all__ = ["METHODS", "Method", "get_method", "method_names", "register"]
