"""RobustEdge: robust distillation, robustness evaluation and verified edge export for small networks.

The Python API (robustedge/api.py) mirrors the CLI: ``load``, ``load_dataset``, ``evaluate``, ``export``,
``verify``, ``train``, ``distill``. It is imported on first use, so ``import robustedge`` stays light.
Three of those names are also modules of the library (``robustedge/evaluate.py``, ``train.py``,
``export/``); on the package they always mean the API functions, and the modules stay importable by
their dotted names (``from robustedge.evaluate import EvalReport``).
"""

import sys
import types

__version__ = "0.1.0"

from robustedge.errors import RobustEdgeError  # noqa: E402

API = ("load", "load_dataset", "evaluate", "export", "verify", "train", "distill")
__all__ = ["RobustEdgeError", "__version__", *API]


class _Package(types.ModuleType):
    """Importing ``robustedge.evaluate`` (the module) would set the package attribute ``evaluate`` to it;
    the API function keeps that name instead (the module is in ``sys.modules`` either way)."""

    def __setattr__(self, name: str, value) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name in API:
            from robustedge import api

            return getattr(api, name)
        raise AttributeError(f"module 'robustedge' has no attribute '{name}'")


sys.modules[__name__].__class__ = _Package
