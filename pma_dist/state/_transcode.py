"""A saved window loaded into a state of another kind: an uncompressed ring into a compressed
window and back, one code into the other, or an fp8 window under a layout that cuts its blocks
elsewhere.

The saved snapshots are rebuilt one tensor at a time in snapshot order (a compressed chain from
its base and differences, in float64) and taken into ``state`` as a new chain: written as they
are into an uncompressed ring, or encoded again (the first exactly, the others as differences
with error feedback). So each snapshot gains at most one rounding of its new difference; an
uncompressed ring read back from a compressed save holds the snapshots as that save had them.
Valid snapshots of an uncompressed ring are taken (its other slots may hold anything); a
compressed chain is taken whole, its rejected snapshots still at weight 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from ..core import AveragingState, SlotRecord, chain_of, merge_order

log = logging.getLogger("pma_dist")

Dense = Callable[[str, int], torch.Tensor]
"""The saved plane ``key`` of averaged tensor ``i``, laid out like this rank's shard."""


def saved_chain(code: str, records: Sequence[SlotRecord | None]) -> list[int]:
    """Physical slots (or planes) of the saved snapshots to take, oldest first."""
    return merge_order(records) if code == "none" else chain_of(records)


def transcode(
    state: AveragingState,
    dense: Dense,
    code: str,
    records: Sequence[SlotRecord | None],
    where: str,
) -> list[SlotRecord | None]:
    """Fill ``state`` with the snapshots of a save kept as ``code`` with ``records``; the new
    records. A save of another kind is taken as a new chain in order from the first plane; a
    save of the same code (fp8 blocks cut elsewhere) is encoded again into the planes it had,
    under its own records, so that its records are right on every rank whether or not that
    rank's layout cut a block (each rank decides from its own blocks, without a collective)."""
    chain = saved_chain(code, records)
    ours = getattr(state, "code", "none")
    same_code = code == ours
    with torch.no_grad():
        for i in range(len(state.shapes)):
            snapshots = _snapshots(dense, code, chain, i)
            if same_code:
                state.rebuild(i, snapshots, planes=chain)
            else:
                state.rebuild(i, snapshots)
    log.warning(
        "pma_dist: %s: PMA state kept as %s taken into a window kept as %s (%d snapshots; each "
        "gains at most one rounding of its new difference)",
        where,
        code,
        ours,
        len(chain),
    )
    if same_code:
        return list(records)
    taken = [records[k] for k in chain]
    return taken + [None] * (len(state.records) - len(taken))


def _snapshots(dense: Dense, code: str, chain: list[int], i: int) -> Iterator[torch.Tensor]:
    if code == "none":
        for k in chain:
            yield dense(f"slots.{k}", i)
        return
    base = dense("base", i).double()
    for k in chain[1:]:
        base -= dense(f"deltas.{k}", i).double()
    yield base.float()
    for k in chain[1:]:
        base += dense(f"deltas.{k}", i).double()
        yield base.float()
