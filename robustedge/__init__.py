"""RobustEdge: robust distillation, robustness evaluation and verified edge export for small networks.

The Python API (robustedge/api.py) mirrors the CLI: ``load``, ``load_dataset``, ``evaluate``, ``export``,
``verify``, ``train``, ``distill``, plus ``register_model`` / ``register_dataset`` / ``register_method``
for a user's own pieces. The API is imported on first use, so ``import robustedge`` stays light: no
library module shares a name with an API function (the suite is ``robustedge.suite``, the trainer
``robustedge.trainer``, the export machinery ``robustedge.edge``).
"""

from robustedge._version import __version__
from robustedge.errors import RobustEdgeError

API = ("load", "load_dataset", "evaluate", "export", "verify", "train", "distill", "register_model",
       "register_dataset", "register_method")
__all__ = ["RobustEdgeError", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from robustedge import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustedge' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
