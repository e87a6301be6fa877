"""Checks of user options, shared so that every class refuses a bad value with the same message shape.

``check_int("batch_size", 2.5, minimum=1)`` raises ``ValueError: batch_size must be an integer >= 1, got 2.5``:
the option's name as the user typed it, what is allowed, and the value given. ``bool`` is refused where an integer
is expected (``True`` is an ``int`` to Python, never what a user meant by ``batch_size: true``).

Example::

    >>> check_int("query_size", 10, minimum=1)
    10
    >>> check_int("query_size", 2.5, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: query_size must be an integer >= 1, got 2.5
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection
from numbers import Integral, Real
from typing import Any


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a ``bool`` nor a float with an integral value."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> Any:
    """Return ``value`` if it is an integer ``>= minimum`` (or ``None`` when allowed), else raise ``ValueError``."""
    if value is None and allow_none:
        return value
    if not is_integer(value) or (minimum is not None and value < minimum):
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[str]) -> Any:
    """Return ``value`` if it is one of ``choices`` (the values of a ``Literal``), else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_float(name: str, value: Any, minimum: float | None = None, strict: bool = False) -> Any:
    """Return ``value`` if it is a finite number ``>= minimum`` (``>`` when ``strict``), else raise ``ValueError``.

    An integer is a number here (``lr: 1``); a ``bool``, ``nan`` or ``inf`` is not.
    """
    if (not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value)
            or (minimum is not None and (value <= minimum if strict else value < minimum))):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return value


def did_you_mean(value: Any, choices: Collection[str]) -> str:
    """`` (did you mean 'entropy'?)`` for the closest of ``choices`` to a mistyped ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=1) if isinstance(value, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""
