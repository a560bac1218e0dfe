"""Full tensors delivered only to the ranks that write them, for export.

A row-sharded DTensor (``Shard(0)`` on one mesh dimension, ``Replicate`` on the others: FSDP2,
and HSDP with its replica groups) reaches each writer piece by piece from the ranks of the
writer's own slice of that dimension: each of them sends its rows once, point to point, and
keeps nothing; the writer receives one piece at a time into the full tensor in host memory
(on an accelerator, through a buffer of one piece). Ranks outside the writer's slice take no
part. Replicated tensors need no communication. Any other layout falls back to
``full_tensor()`` on every rank.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def meta_like(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``tensor``'s full shape and dtype: what a rank that writes nothing
    of it hands its writer, which needs only the shape to follow the plan."""
    return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")


def deliver(tensor: torch.Tensor, writers: Collection[int], me: int) -> torch.Tensor:
    """``tensor`` in full on each global rank in ``writers`` (host memory for a gathered one),
    a meta tensor on every other rank. Collective over the ranks holding its pieces."""
    if not isinstance(tensor, DTensor):
        return tensor if me in writers else meta_like(tensor)
    placements = tuple(tensor.placements)
    sharded = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not sharded:
        return tensor.to_local() if me in writers else meta_like(tensor)
    if len(sharded) > 1 or not placements[sharded[0]].is_shard(0):
        full = tensor.full_tensor()
        return full if me in writers else meta_like(tensor)
    if tensor.device_mesh.size(sharded[0]) == 1:
        return tensor.to_local() if me in writers else meta_like(tensor)
    group = tensor.device_mesh.get_group(sharded[0])
    members = dist.get_process_group_ranks(group)
    out = meta_like(tensor)
    for writer in sorted(w for w in writers if w in members):
        received = _gather_rows(tensor, group, members, writer, me)
        if received is not None:
            out = received
    return out


def _gather_rows(
    tensor: DTensor, group: dist.ProcessGroup, members: list[int], writer: int, me: int
) -> torch.Tensor | None:
    """The full row-sharded ``tensor`` on ``writer`` (None elsewhere), one piece at a time."""
    local = tensor.to_local()
    rows, size = tensor.shape[0], len(members)
    chunk = -(-rows // size)
    spans = [(c * chunk, max(0, min(chunk, rows - c * chunk))) for c in range(size)]
    if me != writer:
        _, count = spans[members.index(me)]
        if count:
            dist.send(local.contiguous(), dst=writer, group=group)
        return None
    full = torch.empty(tuple(tensor.shape), dtype=local.dtype, device="cpu")
    staging = None
    for member, (start, count) in zip(members, spans):
        if not count:
            continue
        target = full[start : start + count]
        if member == me:
            target.copy_(local)
        elif local.device.type == "cpu":
            dist.recv(target, src=member, group=group)
        else:
            if staging is None or staging.shape[0] < count:
                staging = torch.empty(
                    (chunk, *tensor.shape[1:]), dtype=local.dtype, device=local.device
                )
            dist.recv(staging[:count], src=member, group=group)
            target.copy_(staging[:count])
    return full
