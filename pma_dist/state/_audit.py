"""The replica audit: ranks that hold the same elements must hold bit-identical averaging state.

Nothing is gathered: each rank reduces its shards to (layout, checksums) digests and routes each
to the rank its layout hashes to (``_comm.route``), which compares the replicas it
receives; one all-reduce then tells every rank whether counts, records and replicas agree. A
rank's traffic is its own shards' digests, not the world's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from .. import _comm as comm
from ..backends import Backend
from ..core import AveragingState
from ..errors import PMAStateError
from ._checksum import bit_checksum

NONE = (1 << 62) - 1
"""No replica differs."""


def check_replicas(
    backend: Backend, state: AveragingState, counts: Any, group: dist.ProcessGroup | None
) -> None:
    """Raise ``PMAStateError`` on every rank unless all ranks agree on ``counts`` and on the slot
    records, and every tensor that several ranks hold the same elements of (DDP or HSDP
    replicas, buffers) holds bit-identical slots on each. Collective; one read of the slots,
    whose padding is always zero."""
    state.wait_host()
    group = group if group is not None else comm.default_group()
    rank, world = comm.rank(group), comm.world_size(group)
    rows = []
    for i, shard in enumerate(backend.shards()):
        layout = _digest(repr([(f.param, f.start, f.numel) for f in shard.fragments]))
        rows.append((layout, _digest(repr([bit_checksum(t) for t in state.planes(i)])), rank))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    received = comm.route(table, [layout % world for layout, _, _ in rows], group)
    summary_text = repr((counts, state.state_dict()))
    summary = _digest(summary_text)
    verdict = torch.tensor([summary, -summary, _first_difference(received, world)])
    if group is not None:
        verdict = verdict.to(comm.collective_device(group, verdict.device))
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    lowest, negated_highest, difference = verdict.tolist()
    if lowest != -negated_highest:
        summaries = comm.gather_to_first(summary_text, group=group)
        message = None
        if summaries is not None:
            message = f"ranks disagree on counts and slot records: {sorted(set(summaries))}"
        raise PMAStateError(comm.broadcast_object(message, group=group))
    if difference != NONE:
        holder, other = divmod(difference, world)
        raise PMAStateError(
            f"replicas differ: ranks {holder} and {other} hold the same elements but different "
            "averaging state"
        )


def _digest(text: str) -> int:
    """62 bits of the SHA-1 of ``text`` (an int64 that can be negated)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little") & ((1 << 62) - 1)


def _first_difference(received: torch.Tensor, world: int) -> int:
    """``holder * world + rank`` for the first pair of received rows with one layout but other
    checksums (holder: the lowest rank holding that layout), or :data:`NONE`."""
    first: dict[int, tuple[int, int]] = {}
    found = NONE
    for layout, sums, rank in sorted(map(tuple, received.tolist()), key=lambda r: r[2]):
        holder, expected = first.setdefault(layout, (rank, sums))
        if sums != expected:
            found = min(found, holder * world + rank)
    return found
