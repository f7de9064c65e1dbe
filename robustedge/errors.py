"""The one exception type users see.

Everything a user can get wrong (a name, a path, a shape, a flag, a bundle) raises
``RobustEdgeError`` with a one-line message that says what was wrong and what would be right. The
CLI prints that line and exits 2; anything else escaping is a bug in RobustEdge and keeps its
traceback. The class is defined in the torch-free :mod:`robustedge.verifier` (which every bundle
carries as its own verifier), so the library and the on-device verifier raise the same type. So do the
two helpers that cut a foreign exception down to what a one-line error may say about it.
"""

from robustedge.verifier.base import RobustEdgeError, exception_line, first_line


class Diverged(RobustEdgeError):
    """Training produced a NaN where a library, not the trainer's loss check, noticed it first (torchao's
    observers assert on a NaN range): the trainer catches it and says in which epoch and step."""


def unknown_name(kind: str, name: str, valid: "list[str] | tuple[str, ...]") -> RobustEdgeError:
    return RobustEdgeError(f"unknown {kind} '{name}'; valid {kind}s: {', '.join(sorted(valid))}")


__all__ = ["Diverged", "RobustEdgeError", "exception_line", "first_line", "unknown_name"]
