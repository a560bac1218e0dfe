"""Snapshot weights: SMA, WMA, EMA and decay-shaped merges over a window, the running-mode lerp
weights, user weights, and the resolution of a merge request (which snapshots, which weights)
to one weight per held snapshot. Pure Python."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..config import DECAY_METHODS, METHODS
from ._spec import MergeSpec

DECAYS = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "minus_sqrt": lambda x: 1.0 - math.sqrt(x),
}
"""Learning-rate decay shapes f on [0, 1], from f(0) = 1 to f(1) = 0."""


def decay_weights(method: str, n: int) -> list[float]:
    """Weights of ``n`` snapshots, oldest first, that replay the window's updates under the
    decay ``DECAYS[method]``.

    With snapshots theta_1..theta_n a constant learning rate apart, decaying the rate by f over
    the window gives theta_1 + sum_{j=1}^{n-1} f(j/n) (theta_{j+1} - theta_j). Collecting the
    terms of each snapshot gives sum_k c_k theta_k with c_k = f((k-1)/n) - f(k/n) (theta_1
    keeps f(0) - f(1/n), theta_n gets f((n-1)/n) - f(1)), and the c_k sum to f(0) - f(1) = 1.
    ``linear`` (f = 1 - x) is exactly SMA.
    """
    f = DECAYS[method]
    return [f((k - 1) / n) - f(k / n) for k in range(1, n + 1)]


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
    if method in DECAY_METHODS:
        return decay_weights(method, n)
    raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")


def running_weight(method: str, k: Any, alpha: float = 0.2) -> Any:
    """The lerp weight that folds snapshot ``k`` (1-based) into a running average: 1 for the
    first, whatever the method. Branch-free, so that ``k`` may also be a tensor on a device
    (the count kept there, read by no host sync): the weight is then a tensor of its dtype.
    """
    if method == "sma":
        return 1.0 / k
    if method == "wma":
        return 2.0 / (k + 1)
    if method == "ema":
        return float(alpha) ** ((k > 1) + 0 * k)  # the exponent 0 or 1 in k's dtype
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


def resolve_weights(n: int, spec: MergeSpec, alpha: float) -> list[float]:
    """One weight per held snapshot (``n``, oldest first) for the merge ``spec`` asks for: by
    its method over the newest ``last`` snapshots taken every ``stride``-th (N = last, V =
    stride x interval, from one ring; the others weigh zero and are never read), or by its
    explicit ``weights`` (normalized). ``last`` defaults to as many as fit at ``stride`` (all of
    them at stride 1)."""
    weights, last, stride = spec.weights, spec.last, spec.stride
    if weights is not None and (last is not None or stride is not None):
        raise ValueError("pass last=/stride= or weights=, not both (give zero weights instead)")
    if weights is not None:
        return normalized_weights(weights, n)
    method = spec.method
    if method not in METHODS:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    step = 1 if stride is None else stride
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"stride={stride!r}: must be a positive integer")
    most = (n - 1) // step + 1 if n else 0
    k = most if last is None else last
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
        at = f", at stride {step} the newest {most} fit" if step > 1 else ""
        raise ValueError(
            f"last={last!r}: must be an integer in [1, {most}] ({n} snapshots held{at}: "
            f"last snapshots every stride-th span (last - 1) * stride + 1)"
        )
    out = [0.0] * n
    for i, weight in enumerate(window_weights(method, k, alpha)):
        out[n - 1 - (k - 1 - i) * step] = weight
    return out
