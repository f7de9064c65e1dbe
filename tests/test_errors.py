"""The one helper that cuts a foreign exception down to what a one-line error may say about it."""

import pytest

from robustedge.errors import exception_line, first_line


@pytest.mark.parametrize("exc, first, typed", [
    (ValueError("bad shape"), "bad shape", "ValueError: bad shape"),
    (RuntimeError("\n  \nTraceback (most recent call last):\n  File x"), "Traceback (most recent call last):",
     "RuntimeError: Traceback (most recent call last):"),
    (OSError(""), "OSError", "OSError"),
    (ValueError("   "), "ValueError", "ValueError"),
    (EOFError(), "EOFError", "EOFError"),
])
def test_one_line_of_any_exception(exc, first, typed):
    assert first_line(exc) == first and exception_line(exc) == typed
    assert "\n" not in first_line(exc) + exception_line(exc)


def test_a_long_line_is_cut_at_the_limit():
    exc = ValueError("x" * 500)
    assert first_line(exc, limit=20) == "x" * 17 + "..." and len(exception_line(exc, limit=20)) == len("ValueError: ") + 20
