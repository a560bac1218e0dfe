"""How far a compressed window's merge may lie from the float64 merge of the true snapshots,
worked out from the codes' definitions, not from pma_dist's code.

A window chain stores each snapshot after its first as d_j = q(theta_j - R_{j-1}), where
R_{j-1} is the previous snapshot up to its own rounding; so |d_j| <= |theta_j - theta_{j-1}|
plus that rounding, and snapshot j comes back with one rounding of d_j: at most 2^-8 |d_j| in
bfloat16 (8 significant bits, round to nearest); in float8 e4m3 at most 2^-4 |d_j| (4
significant bits) or, below e4m3's normal range, half its subnormal step, 2^-10 of the block's
power-of-two scale, which is under 2^-7.8 of the block's largest |d| (that largest value is
scaled to between 224 and 448). The reconstruction sums float32 values in float64, so each later
float32 update of the base adds at most 2^-24 of the largest |theta| (and the result one more).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]

RELATIVE = {"bf16": 2.0**-8, "fp8": 2.0**-4}
"""Largest relative rounding of a difference, per code."""
SUBNORMAL = {"bf16": 0.0, "fp8": 2.0**-10 / 224}
"""Largest absolute rounding below the normal range, relative to the largest difference."""


def compressed_error_bounds(chain: Sequence[State], code: str) -> list[dict[str, torch.Tensor]]:
    """Per snapshot of ``chain`` (every snapshot since the chain started, oldest first), an
    element-wise float64 bound on how far its reconstruction lies from it, float32 noise aside:
    0 for the first (kept exactly), one rounding of its difference for the others."""
    u, floor = RELATIVE[code], SUBNORMAL[code]
    bounds: list[dict[str, torch.Tensor]] = []
    for j, snapshot in enumerate(chain):
        out = {}
        for name, theta in snapshot.items():
            if j == 0:
                out[name] = torch.zeros_like(theta, dtype=torch.float64)
                continue
            step = (theta.double() - chain[j - 1][name].double()).abs()
            carried = bounds[-1][name]
            difference = step + carried
            largest = difference.max() if difference.numel() else difference.sum()
            out[name] = u * difference + floor * largest
        bounds.append(out)
    return bounds


def assert_compressed_merge(
    merged: State,
    chain: Sequence[State],
    weights: Sequence[float],
    code: str,
    what: str = "",
    roundings: int = 1,
) -> None:
    """Fail unless ``merged`` lies within the codes' bound of ``sum_j weights[j] * chain[j]``
    (float64) for every element; ``weights`` has one entry per chain snapshot (0 where a
    snapshot is not merged). ``roundings``: how many times each snapshot was encoded (2 after a
    window is taken in again under another layout or code)."""
    if len(weights) != len(chain):
        raise ValueError(f"{len(weights)} weights for a chain of {len(chain)} snapshots")
    bounds = compressed_error_bounds(chain, code)
    for name in chain[0]:
        exact = sum(w * s[name].double() for w, s in zip(weights, chain))
        allowed = roundings * sum(abs(w) * b[name] for w, b in zip(weights, bounds))
        largest = max(float(s[name].double().abs().max()) for s in chain) if exact.numel() else 0
        allowed = allowed + (len(chain) + 2) * 2.0**-24 * largest
        excess = (merged[name].double() - exact).abs() - allowed
        excess = excess.nan_to_num(nan=float("inf"))
        if excess.numel() and float(excess.max()) > 0:
            worst = int(excess.argmax())
            raise AssertionError(
                f"{what}: {name} element {worst} is {float(excess.view(-1)[worst]):.3g} beyond "
                f"the {code} bound of {float(allowed.view(-1)[worst]):.3g}"
            )
