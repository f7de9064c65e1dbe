"""Parsing and checking the numbers users type: one place, used by the CLI, the configs and the API.

Every numeric setting is checked where it is read, so a bad value is a one-line error naming the
setting before anything runs or touches disk. Numbers may be written as fractions (``8/255``), as
the field writes eps; non-finite numbers (``nan``, ``inf``) are always refused.
"""

from __future__ import annotations

import math
from typing import Any

from robustedge.errors import RobustEdgeError

MAX_SEED = 2**31 - 1

# AutoAttack's block: pyautoattack draws its random numbers per call and per batch, so its per-example results
# depend on how the examples are blocked. The block is therefore fixed, not derived from --batch-size (which
# `auto` sizes from free memory): the same numbers on every machine and for any number of processes. 250 is
# the package's own default batch (`run_standard_evaluation(..., batch_size=250)`).
AUTOATTACK_BLOCK = 250


def parse_number(value: Any, name: str) -> float:
    """A finite number from a number or a string such as ``0.1``, ``8/255`` or ``1e-3``."""
    if isinstance(value, bool):
        raise RobustEdgeError(f"{name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                number = float(num) / float(den)
            else:
                number = float(text)
        except (ValueError, ZeroDivisionError):
            raise RobustEdgeError(f"{name} must be a number (e.g. 0.1 or 8/255), got {value!r}") from None
    else:
        raise RobustEdgeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise RobustEdgeError(f"{name} must be a finite number, got {value!r}")
    return number


def parse_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (from an int or its decimal string) within the given bounds."""
    if isinstance(value, bool):
        raise RobustEdgeError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise RobustEdgeError(f"{name} must be an integer, got {value!r}") from None
    if not isinstance(value, int):
        raise RobustEdgeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = (f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]") if minimum is not None \
            else f"<= {maximum}"
        raise RobustEdgeError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_range(value: float, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` within [low, high] (or the open ends asked for), else a one-line error."""
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f"in {lo}, {hi}" if low is not None and high is not None else \
            (f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise RobustEdgeError(f"{name} must be {where}, got {value:g}")
    return value


def parse_eps(value: Any, name: str = "eps") -> float:
    return check_range(parse_number(value, name), name, 0.0, 1.0)


def parse_fraction(value: Any, name: str) -> float:
    return check_range(parse_number(value, name), name, 0.0, 1.0)


def parse_positive(value: Any, name: str) -> float:
    return check_range(parse_number(value, name), name, 0.0, low_open=True)


def parse_seed(value: Any, name: str = "seed") -> int:
    return parse_int(value, name, 0, MAX_SEED)


def parse_batch_size(value: Any, name: str = "batch size") -> int | str:
    """An integer >= 1, or ``'auto'`` (the largest batch that fits in memory)."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    try:
        return parse_int(value, name, 1)
    except RobustEdgeError:
        raise RobustEdgeError(f"{name} must be an integer >= 1 or 'auto', got {value!r}") from None


def parse_port(value: Any, name: str = "port") -> int:
    return parse_int(value, name, 1, 65535)
