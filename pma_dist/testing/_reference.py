"""Independent float64 references for PMA merges, and the comparisons the tests use.

Written from the paper's definitions (mean, position-weighted mean, EMA recursion), not from
pma_dist's weight functions, so a shared mistake cannot make both sides agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def _stack(snapshots: Sequence[State], name: str) -> torch.Tensor:
    return torch.stack([s[name].to(torch.float64) for s in snapshots])


def merge_reference(
    snapshots: Sequence[State],
    method: str,
    alpha: float = 0.2,
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The float64 merge of ``snapshots`` (oldest first) by ``method`` or explicit ``weights``."""
    out = {}
    for name in snapshots[0]:
        x = _stack(snapshots, name)
        if weights is not None:
            w = torch.tensor(weights, dtype=torch.float64)
            out[name] = torch.einsum("k,k...->...", w / w.sum(), x)
        elif method == "sma":
            out[name] = x.mean(0)
        elif method == "wma":
            pos = torch.arange(1, len(x) + 1, dtype=torch.float64)
            out[name] = torch.einsum("k,k...->...", pos, x) / pos.sum()
        elif method == "ema":
            acc = x[0].clone()
            for theta in x[1:]:
                acc = alpha * theta + (1 - alpha) * acc
            out[name] = acc
        else:
            raise ValueError(method)
    return out


DECAYS = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: (1.0 + math.cos(math.pi * x)) / 2.0,
    "minus_sqrt": lambda x: 1.0 - math.sqrt(x),
}
"""The learning-rate decays of the decay-shaped merges (WSM), from f(0) = 1 to f(1) = 0."""


def reference_weights(method: str, n: int, alpha: float = 0.2) -> list[float]:
    """The weight of each of ``n`` snapshots (oldest first) in a ``method`` merge, from the
    definitions: :func:`merge_reference` of one-hot snapshots, or, for a decay-shaped merge,
    c_k = f((k - 1) / n) - f(k / n) (the window's updates replayed under the decay f)."""
    if method in DECAYS:
        f = DECAYS[method]
        return [f((k - 1) / n) - f(k / n) for k in range(1, n + 1)]
    basis = [{"e": torch.eye(n, dtype=torch.float64)[j]} for j in range(n)]
    return merge_reference(basis, method, alpha)["e"].tolist()


def window_reference(
    snapshots: Sequence[State], window: int, method: str, alpha: float = 0.2, weights=None
) -> dict[str, torch.Tensor]:
    """The float64 merge of the last ``window`` snapshots."""
    return merge_reference(list(snapshots)[-window:], method, alpha, weights)


def max_rel_error(actual: State, expected: State) -> tuple[float, str]:
    """Worst ``max|a - e| / max|e|`` over the tensors, and the tensor where it occurs.

    Scale-relative per tensor, so elements near zero (where element-wise relative error means
    nothing) do not dominate.
    """
    if set(actual) != set(expected):
        raise AssertionError(f"different tensors: {sorted(set(actual) ^ set(expected))}")
    worst, where = 0.0, ""
    for name, e in expected.items():
        e = e.to(torch.float64)
        a = actual[name].to(torch.float64)
        if a.shape != e.shape:
            raise AssertionError(f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}")
        if e.numel() == 0:
            continue
        err = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-30)
        if not err <= worst:
            worst, where = err, name
    return worst, where


def assert_close_rel(actual: State, expected: State, tol: float = 1e-6, what: str = "") -> None:
    """Fail unless every tensor of ``actual`` is within ``tol`` scale-relative of ``expected``."""
    err, where = max_rel_error(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol:g} in {where!r}")


def assert_bitwise_equal(actual: State, expected: State, what: str = "") -> None:
    """Fail unless both hold the same tensors with identical bits (NaN payloads included)."""
    if set(actual) != set(expected):
        raise AssertionError(f"{what}: different tensors {sorted(set(actual) ^ set(expected))}")
    for name, e in expected.items():
        a = actual[name]
        if a.dtype != e.dtype or a.shape != e.shape:
            raise AssertionError(
                f"{what}: {name} is {a.dtype}{tuple(a.shape)}, expected {e.dtype}{tuple(e.shape)}"
            )
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[e.element_size()]
        if not torch.equal(a.contiguous().view(bits), e.contiguous().view(bits)):
            diff = (a.contiguous().view(bits) != e.contiguous().view(bits)).sum().item()
            raise AssertionError(f"{what}: {name} differs in {diff} element(s)")
