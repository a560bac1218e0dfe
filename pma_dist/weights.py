"""Snapshot weights: SMA, WMA and EMA over a window, the running-mode lerp weights, user
weights, and the resolution of a merge request to one weight per held snapshot. Pure Python."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import METHODS


def window_weights(method: str, n: int, alpha: float = 0.2) -> list[float]:
    """Weights of ``n`` snapshots, oldest first, summing to one.

    SMA: 1/n each. WMA: proportional to the position i = 1..n. EMA: the paper's recursion
    M_1 = theta_1, M_i = alpha * theta_i + (1 - alpha) * M_(i-1), unrolled.
    """
    if n < 1:
        raise ValueError(f"window_weights(n={n}): at least one snapshot is needed")
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method == "ema":
        return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    raise ValueError(f"method={method!r}: must be one of sma, wma, ema")


def running_weight(method: str, k: int, alpha: float = 0.2) -> float:
    """The lerp weight that folds snapshot ``k`` (1-based) into a running average."""
    if k == 1:
        return 1.0
    if method == "sma":
        return 1.0 / k
    if method == "wma":
        return 2.0 / (k + 1)
    if method == "ema":
        return float(alpha)
    raise ValueError(f"method={method!r}: must be one of sma, wma, ema")


def normalized_weights(weights: Sequence[float], n: int) -> list[float]:
    """User weights for ``n`` snapshots (oldest first), scaled to sum to one."""
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(
            f"weights={list(weights)!r}: expected {n} weights (one per snapshot in the window, "
            "oldest first)"
        )
    total = math.fsum(values)
    if not all(math.isfinite(w) for w in values) or abs(total) < 1e-12:
        raise ValueError(f"weights={list(weights)!r}: must be finite with a non-zero sum")
    return [w / total for w in values]


def resolve_weights(
    n: int,
    method: str,
    alpha: float,
    weights: Sequence[float] | None = None,
    last: int | None = None,
) -> list[float]:
    """One weight per held snapshot (``n``, oldest first) for a merge by ``method`` over all of
    them, by ``method`` over the newest ``last`` (older ones weigh zero and are never read), or
    by explicit ``weights`` (normalized)."""
    if last is not None and weights is not None:
        raise ValueError("pass last= or weights=, not both (give zero weights instead)")
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    if weights is not None:
        return normalized_weights(weights, n)
    k = n if last is None else last
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"last={last!r}: must be an integer in [1, {n}] (snapshots held)")
    return [0.0] * (n - k) + window_weights(method, k, alpha)
