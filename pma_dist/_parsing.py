"""Numbers as people write them in configs: integers, integral floats (``4e9``) and token
counts with a suffix (``"4B"``, ``"500M"``)."""

from __future__ import annotations

import math
import numbers
from typing import Any

TOKEN_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
"""Multipliers of a token count's suffix (case-insensitive)."""


def is_int(value: Any) -> bool:
    """An integer, and not a bool (``True`` is no window size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def strict_int(value: Any) -> int | None:
    """``value`` as an int when it is one or an integral float, else None."""
    if is_int(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_count(value: Any) -> int | None:
    """Parse a token count: an int, an integral float, or a string like ``"4B"`` or ``"4e9"``."""
    if isinstance(value, str):
        text = value.strip().lower().replace("_", "")
        scale = 1
        if text and text[-1] in TOKEN_SUFFIXES:
            scale = TOKEN_SUFFIXES[text[-1]]
            text = text[:-1]
        try:
            number = float(text) * scale
        except ValueError:
            return None
        if not math.isfinite(number) or not number.is_integer():
            return None
        return int(number)
    return strict_int(value)
