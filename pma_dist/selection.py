"""Picking the merge on held-out data: candidate merges (method, N, stride) from one ring, each
swapped into the live model in turn, evaluated by the user's function on every rank, averaged
over the ranks, and ranked against the live model.

Candidates that weigh the held snapshots alike (``linear`` and ``sma``, every method at N = 1)
are evaluated once. Each costs one merge and one evaluation, with no memory beyond a swap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import comm

if TYPE_CHECKING:
    from .merger import Merger

GRID_METHODS = ("sma", "wma", "ema", "cosine", "minus_sqrt")
"""Methods of the default grid (``linear`` is ``sma``)."""


@dataclass(frozen=True)
class Candidate:
    """One merge of the held snapshots."""

    method: str
    """Weighting, as ``Merger.swapped(method)`` takes it."""
    last: int | None = None
    """N: the newest ``last`` snapshots (None: as many as fit at ``stride``)."""
    stride: int = 1
    """Every ``stride``-th snapshot (V = stride x interval)."""

    def fits(self, held: int) -> bool:
        """Whether ``held`` valid snapshots span this merge."""
        return held >= 1 and ((self.last or 1) - 1) * self.stride + 1 <= held

    def __str__(self) -> str:
        return (
            f"{self.method} N={self.last if self.last is not None else 'all'} stride={self.stride}"
        )


@dataclass(frozen=True)
class Selection:
    """What :func:`select` found."""

    baseline: float
    """The live model's loss (ranks averaged)."""
    rows: list[tuple[Candidate, float]]
    """Each distinct candidate and its loss (ranks averaged), best first."""

    @property
    def best(self) -> Candidate:
        return self.rows[0][0]

    def table(self) -> str:
        """The ranking as a Markdown table, the live model last."""
        lines = ["| merge | loss | vs live |", "|---|---|---|"]
        for candidate, loss in self.rows:
            lines.append(f"| {candidate} | {loss:.6g} | {loss - self.baseline:+.4g} |")
        lines.append(f"| live model | {self.baseline:.6g} | |")
        return "\n".join(lines)


def default_candidates(held: int, methods: Sequence[str] = GRID_METHODS) -> list[Candidate]:
    """``methods`` x N in powers of two up to ``held`` x the power-of-two strides that fit."""
    sizes = [2**i for i in range(held.bit_length()) if 2**i <= held]
    return [
        Candidate(method, n, stride)
        for method in methods
        for n in sizes
        for stride in sizes
        if (n - 1) * stride + 1 <= held and (stride == 1 or n > 1)
    ]


def select(
    merger: Merger,
    evaluate: Callable[[], Any],
    candidates: Sequence[Candidate] | None = None,
    *,
    apply_best: bool = False,
    export_best: str | Path | None = None,
    **export_options: Any,
) -> Selection:
    """Evaluate each distinct candidate merge and the live model; optionally apply or export
    the best one. Collective: every rank calls it, and ``evaluate`` on every rank."""
    if candidates is None:
        candidates = default_candidates(merger.window_size)
    seen, distinct = set(), []
    for candidate in candidates:
        weights = merger.weights_for(candidate.method, last=candidate.last, stride=candidate.stride)
        key = tuple(round(w, 12) for w in weights)
        if key not in seen:
            seen.add(key)
            distinct.append(candidate)
    group = merger.process_group
    baseline = comm.mean_over_ranks([evaluate()], group)[0]
    rows = []
    for candidate in distinct:
        with merger.swapped(candidate.method, last=candidate.last, stride=candidate.stride):
            rows.append((candidate, comm.mean_over_ranks([evaluate()], group)[0]))
    rows.sort(key=lambda row: row[1])
    result = Selection(baseline, rows)
    best = result.best
    if export_best is not None:
        merger.export(
            export_best, method=best.method, last=best.last, stride=best.stride, **export_options
        )
    if apply_best:
        merger.apply(best.method, last=best.last, stride=best.stride)
    return result
