"""Argument checks for typed constructors: each value is checked once, where it is configured.

Every check raises :class:`~difftime.utils.ConfigError` naming the key, the value and the
allowed range; the command-line entry point prefixes the key with its full config path.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, TypeVar

from difftime.utils import ConfigError

V = TypeVar("V")


def integer(key: str, value: Any, owner: str, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` as an int >= ``minimum`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}" + (" or null" if optional else ""), owner)
    return int(value)


def real(key: str, value: Any, owner: str, low: float = 0.0, high: float = math.inf,
         low_open: bool = True, high_open: bool = True, optional: bool = False) -> float | None:
    """``value`` as a finite float in the interval (low, high), bounds open or closed."""
    if value is None and optional:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise ConfigError(key, value, f"a finite number in {left}{low:g}, {hi}{right}" + (" or null" if optional else ""),
                          owner)
    return float(value)


def choice(key: str, value: V, options: Iterable[V], owner: str) -> V:
    """``value`` if it is one of ``options``."""
    options = tuple(options)
    if value not in options:
        raise ConfigError(key, value, "one of " + ", ".join(repr(o) for o in options), owner)
    return value
