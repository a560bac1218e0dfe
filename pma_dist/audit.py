"""The replica audit: ranks that hold the same elements must hold bit-identical averaging state."""

from __future__ import annotations

import hashlib
from typing import Any

import torch.distributed as dist

from . import comm
from .averaging import AveragingState
from .backends import Backend
from .errors import PMAStateError
from .state_files import bit_checksum


def check_replicas(
    backend: Backend, state: AveragingState, counts: Any, group: dist.ProcessGroup | None
) -> None:
    """Raise ``PMAStateError`` on every rank unless all ranks agree on ``counts`` and on the slot
    records, and every tensor that several ranks hold the same elements of (DDP or HSDP
    replicas, buffers) holds bit-identical slots on each. Collective; one read of the slots,
    whose padding is always zero."""
    state.wait_host()
    mine: dict[str, list[int]] = {}
    for i, shard in enumerate(backend.shards()):
        layout = repr([(f.param, f.start, f.numel) for f in shard.fragments])
        key = hashlib.sha1(layout.encode()).hexdigest()
        mine[key] = [bit_checksum(slot[i]) for slot in state.slots]
    summary = repr((counts, state.state_dict()))
    everyone = comm.gather_objects((summary, mine), group=group)
    if len({s for s, _ in everyone}) > 1:
        raise PMAStateError(
            f"ranks disagree on counts and slot records: {sorted({s for s, _ in everyone})}"
        )
    first: dict[str, tuple[int, list[int]]] = {}
    for rank, (_, sums) in enumerate(everyone):
        for key, values in sums.items():
            holder, expected = first.setdefault(key, (rank, values))
            if values != expected:
                raise PMAStateError(
                    f"replicas differ: ranks {holder} and {rank} hold the same elements but "
                    "different averaging state"
                )
