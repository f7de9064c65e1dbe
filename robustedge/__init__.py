"""RobustEdge: robust distillation, robustness evaluation and verified edge export for small networks."""

__version__ = "0.1.0"

from robustedge.errors import RobustEdgeError

__all__ = ["RobustEdgeError", "__version__"]
