"""Where a save's parameter elements lie, and the copies that move them onto this rank's shards.

Runs are kept as series (:class:`RunSeries`): ``count`` runs of ``numel`` elements of one
parameter, back to back from ``start``, the i-th in file ``file + i * file_step`` at the same
shard and offset. FSDP2, HSDP and ZeRO-3 put chunk k of every parameter on rank k at the same
place in its shard, so one series describes a parameter however many ranks saved it: a save's
index stays O(parameters), and a rank plans its copies in O(parameters + its own runs) instead
of reading every rank's list (57 MB of JSON for Llama-3-70B at 1024 ranks, on every rank).
DeepSpeed ZeRO-1/2 partitions, replicated buffers and saves of earlier releases are series of
one run each.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..backends import Shard
from ..errors import PMAStateError

Run = tuple[int, int, int, int, int]
"""``(start, numel, file, shard, local_start)``: elements ``[start, start + numel)`` of a
parameter at offset ``local_start`` of shard ``shard`` in saved file ``file``."""


@dataclass(frozen=True)
class Copy:
    """``numel`` elements from saved file ``file``, shard ``src_shard`` at flat ``src`` into
    local shard ``dst_shard`` at flat ``dst``."""

    file: int
    src_shard: int
    src: int
    dst_shard: int
    dst: int
    numel: int


class RunSeries(NamedTuple):
    """``count`` runs of one parameter: run i holds elements from ``start + i * numel``, up to
    ``numel`` of them (the last may be cut short by the parameter's end), in file
    ``file + i * file_step``, shard ``shard``, at ``local_start``."""

    start: int
    numel: int
    count: int
    file: int
    file_step: int
    shard: int
    local_start: int

    def overlapping(self, total: int, lo: int, hi: int) -> Iterator[Run]:
        """The runs of this series that hold elements of ``[lo, hi)`` of a parameter of
        ``total`` elements, computed, not searched."""
        first = max(0, (lo - self.start) // self.numel)
        last = min(self.count, -(-(hi - self.start) // self.numel))
        for i in range(first, last):
            start = self.start + i * self.numel
            numel = min(self.numel, total - start)
            if numel > 0 and start + numel > lo:
                yield start, numel, self.file + i * self.file_step, self.shard, self.local_start


@dataclass
class SavedRuns:
    """Per parameter, its run series sorted by start, and its global shape (in the order
    parameters were first saved). Built once per save, planned against many times."""

    series: dict[str, list[RunSeries]]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, files: list[dict[str, Any]]) -> SavedRuns:
        """The runs of ``files`` as earlier releases listed them: each a dict whose
        ``fragments`` list per shard the runs it holds as ``(param, shape, start, numel,
        local_start)``."""
        series: dict[str, list[RunSeries]] = defaultdict(list)
        shapes: dict[str, tuple[int, ...]] = {}
        for index, f in enumerate(files):
            for shard_index, fragments in enumerate(f["fragments"]):
                for param, shape, start, numel, local_start in fragments:
                    if numel:
                        series[param].append(
                            RunSeries(start, numel, 1, index, 0, shard_index, local_start)
                        )
                    shapes[param] = tuple(shape)
        return cls({p: sorted(s) for p, s in series.items()}, shapes)

    @classmethod
    def from_index(cls, params: Any, files: Any, where: str) -> SavedRuns:
        """The runs of an index's ``params`` list (``{"name", "shape", "runs"}`` each, a run
        series as 7 integers), checked: every file a series names is one of the ``files``
        saved, and no series runs past its parameter."""
        if not isinstance(params, list) or type(files) is not int or files < 1:
            raise PMAStateError(
                f"{where}: the index needs a 'params' list and a positive 'world_size' "
                f"(has {type(params).__name__} and {files!r})"
            )
        series: dict[str, list[RunSeries]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for entry in params:
            name = entry.get("name") if isinstance(entry, dict) else None
            shape, runs = (entry.get("shape"), entry.get("runs")) if name else (None, None)
            if not isinstance(name, str) or name in shapes or not _naturals(shape):
                raise PMAStateError(
                    f"{where}: index entry {str(entry)[:200]} needs a new parameter name and a "
                    "shape of non-negative integers"
                )
            if not isinstance(runs, list) or not all(_is_series(r) for r in runs):
                raise PMAStateError(
                    f"{where}: {name!r}: runs {str(runs)[:200]} are not lists of 7 integers, "
                    "non-negative but the file step"
                )
            series[name] = sorted(RunSeries(*run) for run in runs)
            shapes[name] = tuple(shape)
            for run in series[name]:
                _check_series(run, math.prod(shape), files, f"{where}: {name!r}, run {list(run)}")
        return cls(series, shapes)

    def runs(self, param: str, lo: int, hi: int) -> list[Run]:
        """The saved runs holding elements of ``[lo, hi)`` of ``param``, sorted by start."""
        total = math.prod(self.shapes[param])
        found: list[Run] = []
        for series in self.series.get(param, ()):
            if series.start >= hi:
                break
            found.extend(series.overlapping(total, lo, hi))
        return sorted(found)


def _naturals(values: Any) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


def _is_series(values: Any) -> bool:
    """Seven integers, all but the file step (index 4) non-negative."""
    if not isinstance(values, list) or len(values) != 7 or type(values[4]) is not int:
        return False
    return _naturals(values[:4] + values[5:])


def _check_series(run: RunSeries, total: int, files: int, where: str) -> None:
    if run.numel < 1 or run.count < 1:
        raise PMAStateError(f"{where}: needs numel and count >= 1")
    if run.start >= total or run.count > -(-(total - run.start) // run.numel):
        raise PMAStateError(f"{where}: runs past the parameter's {total} elements")
    if run.count > 1 and run.file_step == 0:
        raise PMAStateError(f"{where}: puts {run.count} runs in one place (file step 0)")
    if not (0 <= run.file < files and 0 <= run.file + (run.count - 1) * run.file_step < files):
        raise PMAStateError(f"{where}: names files beyond the {files} saved")


def plan_copies(
    saved: SavedRuns, shards: list[Shard], *, skip: set[int] | frozenset = frozenset()
) -> list[Copy]:
    """The copies that fill every fragment of ``shards`` (but those at indices ``skip``) from
    the ``saved`` runs.

    Raises ``PMAStateError`` naming the first parameter whose elements are not all saved or
    whose shape differs. Replicas saved by several ranks are read once.
    """
    shapes = saved.shapes
    copies = []
    for dst_shard, shard in enumerate(shards):
        if dst_shard in skip:
            continue
        for frag in shard.fragments:
            if frag.param not in shapes:
                raise PMAStateError(f"saved PMA state has no parameter {frag.param!r}")
            if shapes[frag.param] != tuple(frag.shape):
                raise PMAStateError(
                    f"saved PMA state has {frag.param!r} with shape {shapes[frag.param]}, "
                    f"this model has {tuple(frag.shape)}"
                )
            cursor, end = frag.start, frag.start + frag.numel
            for start, numel, index, src_shard, local_start in saved.runs(frag.param, cursor, end):
                if start > cursor or cursor >= end:
                    break
                stop = min(start + numel, end)
                if stop > cursor:
                    copies.append(
                        Copy(
                            index,
                            src_shard,
                            local_start + cursor - start,
                            dst_shard,
                            frag.local_start + cursor - frag.start,
                            stop - cursor,
                        )
                    )
                    cursor = stop
            if cursor < end:
                raise PMAStateError(
                    f"saved PMA state lacks elements [{cursor}, {end}) of {frag.param!r}"
                )
    return copies
