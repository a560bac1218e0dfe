"""Which rank saves which shard, and the save's runs as series, found without any rank seeing
every rank's layout.

The first rank's fragments are the template. Every other rank compares its own with it
(:func:`describe_rank`): under FSDP2, HSDP and ZeRO-3 rank k holds the template shifted by k
chunks (one integer to send); what differs (replicated buffers, DeepSpeed ZeRO-1/2 partitions,
uneven last chunks of a non-zero shard dimension) is sent as it is, and that is O(the rank's
share). The first rank gathers these (:func:`plan_save`), picks one writer per distinct piece
(the first rank holding it, so replicas are saved once) and turns the writers of each shift
into ``_runs.RunSeries``: what it receives, computes and writes is one
small record per rank plus what the differing shards hold, never world × parameters.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from ..backends import Shard
from ._runs import RunSeries

FragmentRecord = tuple[str, tuple[int, ...], int, int, int]
"""``(param, shape, start, numel, local_start)`` as a save exchanges them."""


def exchanged(shards: list[Shard]) -> list[list[FragmentRecord]]:
    """The fragments of ``shards`` as a save exchanges them (empty ones left out)."""
    return [
        [(f.param, tuple(f.shape), f.start, f.numel, f.local_start) for f in s.fragments if f.numel]
        for s in shards
    ]


def shifted(template: list[FragmentRecord], k: int) -> list[FragmentRecord]:
    """Template fragments moved ``k`` chunks (each its own numel) along their parameter, cut at
    the parameter's end; those starting beyond it dropped."""
    out = []
    for param, shape, start, numel, local_start in template:
        at, total = start + k * numel, math.prod(shape)
        if numel and at < total:
            out.append((param, shape, at, min(numel, total - at), local_start))
    return out


def _shift_of(own: list[FragmentRecord], template: list[FragmentRecord]) -> int | None:
    """The k for which ``own`` is ``template`` shifted by k chunks, if there is one."""
    if not own:
        return None
    first = own[0]
    for param, _, start, numel, _ in template:
        if param == first[0] and numel and first[2] >= start and (first[2] - start) % numel == 0:
            k = (first[2] - start) // numel
            return k if shifted(template, k) == own else None
    return None


@dataclass(frozen=True)
class RankLayout:
    """How one rank's shards relate to the template: what it tells the first rank."""

    shift: int | None
    """Every shard not in ``exceptions`` is the template's shard shifted by this many chunks
    (None: those shards hold nothing)."""
    exceptions: dict[int, int | list[FragmentRecord]] = field(default_factory=dict)
    """Shards that differ: their own shift, or their fragments as they are."""


def describe_rank(
    fragments: list[list[FragmentRecord]], template: list[list[FragmentRecord]]
) -> RankLayout:
    """This rank's layout relative to ``template`` (the first rank's fragments): the shift most
    of its shards follow, and the shards that do not."""
    if len(fragments) != len(template):
        return RankLayout(None, {i: own for i, own in enumerate(fragments) if own})
    shifts = [_shift_of(own, t) for own, t in zip(fragments, template)]
    common = Counter(k for k in shifts if k is not None).most_common(1)
    shift = common[0][0] if common else None
    exceptions: dict[int, int | list[FragmentRecord]] = {}
    for i, (own, k) in enumerate(zip(fragments, shifts)):
        follows = own == shifted(template[i], shift) if shift is not None else not own
        if not follows:
            exceptions[i] = k if k is not None else own
    return RankLayout(shift, exceptions)


class WriteDecision(NamedTuple):
    """What the first rank tells one rank to write."""

    follows: bool
    """Write the shards that follow the rank's shift (it is the first rank with that shift)."""
    shards: dict[int, bool]
    """Shards decided one by one: the rank's exceptions, and shards it writes in place of the
    first rank of its shift, whose own differ."""


@dataclass
class SavePlan:
    """What the first rank decides: who writes what, and where everything then lies."""

    writes: list[WriteDecision]
    """Per rank, what it writes."""
    params: list[dict]
    """The index's run list: ``{"name", "shape", "runs"}`` per parameter, first saved first."""


def plan_save(
    template: list[list[FragmentRecord]],
    layouts: list[RankLayout],
    empty: list[tuple[str, tuple[int, ...]]] = (),
) -> SavePlan:
    """Writers and run series for a save whose ranks have ``layouts``; ``empty`` names the
    parameters of no elements (listed, with no runs, so that loads still check their names)."""
    by_shift: dict[int, list[int]] = defaultdict(list)
    for rank, layout in enumerate(layouts):
        if layout.shift is not None:
            by_shift[layout.shift].append(rank)
    owners = {k: ranks[0] for k, ranks in by_shift.items()}
    writes = [
        WriteDecision(layout.shift is not None and owners[layout.shift] == rank, {})
        for rank, layout in enumerate(layouts)
    ]
    differing: dict[int, dict[int, int | list[FragmentRecord]]] = defaultdict(dict)
    for rank, layout in enumerate(layouts):
        for shard, own in layout.exceptions.items():
            differing[shard][rank] = own
    runs: dict[str, list[RunSeries]] = defaultdict(list)
    shapes: dict[str, tuple[int, ...]] = {}
    default_series = _series(owners)
    for shard, fragments in enumerate(template):
        series = default_series
        if shard in differing:
            shard_owners, decided = _owners_of_shard(owners, by_shift, differing[shard])
            for rank, write in decided.items():
                writes[rank].shards[shard] = write
            series = _series(shard_owners)
        for param, shape, start, numel, local_start in fragments:
            shapes.setdefault(param, tuple(shape))
            if not numel:
                continue
            chunks = -(-(math.prod(shape) - start) // numel)
            for k0, count, file, step in series:
                if k0 < chunks:
                    first = start + k0 * numel
                    count = min(count, chunks - k0)
                    runs[param].append(
                        RunSeries(first, numel, count, file, step, shard, local_start)
                    )
    seen = {_key(fragments) for fragments in template if fragments}
    for shard, ranks in differing.items():
        for rank, own in ranks.items():
            if isinstance(own, int):
                continue
            writes[rank].shards[shard] = write = bool(own) and _key(own) not in seen
            seen.add(_key(own))
            for param, shape, start, numel, local_start in own if write else ():
                shapes.setdefault(param, tuple(shape))
                runs[param].append(RunSeries(start, numel, 1, rank, 0, shard, local_start))
    for param, shape in empty:
        shapes.setdefault(param, tuple(shape))
    params = [
        {"name": p, "shape": list(shape), "runs": [list(s) for s in sorted(runs[p])]}
        for p, shape in shapes.items()
    ]
    return SavePlan(writes, params)


def _owners_of_shard(
    owners: dict[int, int],
    by_shift: dict[int, list[int]],
    differing: dict[int, int | list[FragmentRecord]],
) -> tuple[dict[int, int], dict[int, bool]]:
    """The writer of each shift of one template shard, given the ranks whose copy of that shard
    differs from their shift (``differing``: its own shift, or its fragments); and the ranks
    whose decision for the shard is not their shift's (substitutes, other shifts)."""
    result = {k: r for k, r in owners.items() if r not in differing}
    decided: dict[int, bool] = {}
    for k, ranks in by_shift.items():
        if k not in result:
            substitute = next((r for r in ranks if r not in differing), None)
            if substitute is not None:
                result[k] = substitute
                decided[substitute] = True
    for rank, own in differing.items():
        if isinstance(own, int):
            result.setdefault(own, rank)
            decided[rank] = result[own] == rank
    return result, decided


def _series(owners: dict[int, int]) -> list[tuple[int, int, int, int]]:
    """``owners`` (shift -> file) as ``(first shift, count, first file, file step)`` runs of
    consecutive shifts whose files step evenly."""
    out: list[list[int]] = []
    for k in sorted(owners):
        file = owners[k]
        if out:
            k0, count, file0, step = out[-1]
            if k == k0 + count and (count == 1 or file == file0 + count * step):
                if count == 1:
                    out[-1][3] = file - file0
                out[-1][1] += 1
                continue
        out.append([k, 1, file, 0])
    return [tuple(s) for s in out]


def _key(fragments: list[FragmentRecord]) -> tuple:
    return tuple((param, start, numel) for param, _, start, numel, _ in fragments)


def shard_writes(
    layout: RankLayout, decision: WriteDecision, fragments: list[list[FragmentRecord]]
) -> list[bool]:
    """Which of its shards (holding ``fragments``) a rank writes, from its layout and the first
    rank's decision; a shard holding nothing is never written."""
    return [
        bool(own) and decision.shards.get(i, decision.follows and i not in layout.exceptions)
        for i, own in enumerate(fragments)
    ]
