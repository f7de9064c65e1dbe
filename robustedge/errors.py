"""The one exception type users see.

Everything a user can get wrong (a name, a path, a shape, a flag) raises ``RobustEdgeError`` with a
one-line message that says what was wrong and what would be right. The CLI prints that line and exits
non-zero; anything else escaping is a bug in RobustEdge and keeps its traceback.
"""


class RobustEdgeError(Exception):
    """A user-facing error whose message is complete on its own (no traceback needed)."""


def unknown_name(kind: str, name: str, valid: "list[str] | tuple[str, ...]") -> RobustEdgeError:
    return RobustEdgeError(f"unknown {kind} '{name}'; valid {kind}s: {', '.join(sorted(valid))}")
