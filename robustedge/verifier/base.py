"""What every check stands on: the one user-facing exception type, hashing, and the number checks."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path


class RobustEdgeError(Exception):
    """Something the user can fix (a file, a flag, a bundle); the message is one complete line.

    RobustEdge's one user-facing exception type lives here, in the torch-free verifier, so that the
    library and the on-device verifier raise (and the CLI reports) the very same errors.
    """


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """What a one-line error may say about ``exc``: its message's first non-blank line (cut at ``limit``
    characters), or its type's name when the message is empty. Libraries put tracebacks, hints and
    whole file dumps in their messages; our errors stay one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def exception_line(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first line`` (just ``Type`` for an empty message): for errors whose type says what failed."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}" if str(exc).strip() else type(exc).__name__


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_fraction(v: object) -> bool:
    return is_number(v) and 0.0 <= v <= 1.0


def write_atomically(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, renamed over it once complete: a reader (or
    the process that asked for the file) never sees half of it. The temporary file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
