"""Picking the merge on held-out data: candidate merges (method, N, stride) from one ring, each
swapped into the live model in turn, evaluated by the user's function on every rank, averaged
over the ranks, and ranked against the live model.

Candidates that weigh the held snapshots alike (``linear`` and ``sma``, every method at N = 1)
are evaluated once. Each costs one merge and one evaluation, with no memory beyond a swap.
:func:`select` needs only the few readouts of :class:`Selectable`, which a
:class:`~pma_dist.Merger` has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from .. import _comm as comm
from ..core import MergeSpec

GRID_METHODS = ("sma", "wma", "ema", "cosine", "minus_sqrt")
"""Methods of the default grid (``linear`` is ``sma``)."""


class Selectable(Protocol):
    """What :func:`select` reads of a Merger: the held snapshots' count and the ranks, the
    weights of a merge (to evaluate merges that weigh alike once), and the merge swapped in,
    applied or exported. Kept this small so that selection depends on no Merger internals."""

    process_group: dist.ProcessGroup | None

    @property
    def window_size(self) -> int:
        """Snapshots held that merges can use."""
        ...

    def weights_for(self, method: MergeSpec) -> list[float]:
        """One weight per held snapshot in this merge."""
        ...

    def swapped(self, method: MergeSpec) -> AbstractContextManager[Any]:
        """The merge as the live weights for the body, collective over the ranks."""
        ...

    def apply(self, method: MergeSpec) -> None:
        """The merge as the live weights, for good."""
        ...

    def export(self, path: str | Path, *, method: MergeSpec, **options: Any) -> Path:
        """The merge written to ``path``."""
        ...


@dataclass(frozen=True)
class Selection:
    """What :func:`select` found."""

    baseline: float
    """The live model's loss (ranks averaged)."""
    rows: list[tuple[MergeSpec, float]]
    """Each distinct candidate and its loss (ranks averaged), best first."""

    @property
    def best(self) -> MergeSpec:
        return self.rows[0][0]

    def table(self) -> str:
        """The ranking as a Markdown table, the live model last."""
        lines = ["| merge | loss | vs live |", "|---|---|---|"]
        for candidate, loss in self.rows:
            lines.append(f"| {candidate} | {loss:.6g} | {loss - self.baseline:+.4g} |")
        lines.append(f"| live model | {self.baseline:.6g} | |")
        return "\n".join(lines)


def default_candidates(held: int, methods: Sequence[str] = GRID_METHODS) -> list[MergeSpec]:
    """``methods`` x N in powers of two up to ``held`` x the power-of-two strides that fit."""
    sizes = [2**i for i in range(held.bit_length()) if 2**i <= held]
    return [
        MergeSpec(method, n, stride)
        for method in methods
        for n in sizes
        for stride in sizes
        if (n - 1) * stride + 1 <= held and (stride == 1 or n > 1)
    ]


def select(
    merger: Selectable,
    evaluate: Callable[[], Any],
    candidates: Sequence[MergeSpec] | None = None,
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
        key = tuple(round(w, 12) for w in merger.weights_for(candidate))
        if key not in seen:
            seen.add(key)
            distinct.append(candidate)
    group = merger.process_group
    baseline = comm.mean_over_ranks([evaluate()], group)[0]
    rows = []
    for candidate in distinct:
        with merger.swapped(candidate):
            rows.append((candidate, comm.mean_over_ranks([evaluate()], group)[0]))
    rows.sort(key=lambda row: row[1])
    result = Selection(baseline, rows)
    if export_best is not None:
        merger.export(export_best, method=result.best, **export_options)
    if apply_best:
        merger.apply(result.best)
    return result
