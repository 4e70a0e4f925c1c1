"""The input checks every spec, policy and config makes, written once.

Each ``check_*`` raises a ConfigError naming the field, the value and what was expected (one line,
see errors.py) and returns the value; each ``is_*`` is the same test as a bool, for callers that
word their own message. ``bool`` is never a number here (``True`` is not 1 layer).
"""
from __future__ import annotations

import math
import numbers

from .errors import ConfigError


def is_int(v, minimum: int | None = None, maximum: int | None = None) -> bool:
    """An integer (Python or numpy, not bool) in [minimum, maximum] (either bound may be None)."""
    # the exact type first: the numbers ABC check costs ~1 us, and a workload checks fields per request
    return ((type(v) is int or isinstance(v, numbers.Integral) and not isinstance(v, bool))
            and (minimum is None or v >= minimum) and (maximum is None or v <= maximum))


def is_number(v) -> bool:
    """A real number, not bool (NaN and infinities included: bound them with the comparisons)."""
    return type(v) is float or type(v) is int or isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_positive(v) -> bool:
    """A finite real number > 0."""
    return is_number(v) and math.isfinite(v) and v > 0


def check_int(name: str, v, minimum: int | None = 1, maximum: int | None = None, expected: str | None = None,
              source: str | None = None):
    """``v`` if it is an integer in [minimum, maximum], else ConfigError ("an integer >= 1" unless
    ``expected`` words it)."""
    if not is_int(v, minimum, maximum):
        if expected is None:
            expected = ("an integer" if minimum is None and maximum is None
                        else f"an integer >= {minimum}" if maximum is None
                        else f"an integer <= {maximum}" if minimum is None
                        else f"an integer in [{minimum}, {maximum}]")
        raise ConfigError(name, v, expected, source=source)
    return v


def check_positive(name: str, v, expected: str = "a positive finite number", source: str | None = None):
    """``v`` if it is a finite number > 0, else ConfigError."""
    if not is_positive(v):
        raise ConfigError(name, v, expected, source=source)
    return v


def check_range(name: str, v, low: float, high: float, expected: str, *, low_open: bool = False,
                high_open: bool = False, source: str | None = None):
    """``v`` if it is a number in the range [low, high] (``low_open``/``high_open``: that end
    excluded), else ConfigError with ``expected``."""
    ok = is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ConfigError(name, v, expected, source=source)
    return v


def check_bool(name: str, v, source: str | None = None) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(name, v, "True or False", source=source)
    return v
