"""Full tensors delivered only to the ranks that write them, for export.

A DTensor sharded on one mesh dimension (``Shard(d)`` there, ``Replicate`` on the others: FSDP2,
HSDP with its replica groups, experts sharded on dimension 1) reaches each writer piece by piece
from the ranks of the writer's own slice of that mesh dimension: each of them sends its piece
once, point to point, and keeps nothing; the writer receives one piece at a time into the full
tensor in host memory (through a buffer of one piece where the piece is not contiguous there,
or lives on an accelerator). Ranks outside the writer's slice take no
part. Replicated tensors need no communication. Any other layout falls back to
``full_tensor()`` on every rank.

A tensor held as runs of flat elements on several ranks (DeepSpeed's flat fp32 partitions)
reaches its writers the same way: each writer first gathers where the ranks' runs lie (a few
integers from each rank; the other ranks receive nothing), then each holder sends its runs to
it, point to point.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .._comm import collective_device


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
    if len(sharded) > 1 or not placements[sharded[0]].is_shard():
        full = tensor.full_tensor()
        return full if me in writers else meta_like(tensor)
    if tensor.device_mesh.size(sharded[0]) == 1:
        return tensor.to_local() if me in writers else meta_like(tensor)
    group = tensor.device_mesh.get_group(sharded[0])
    members = dist.get_process_group_ranks(group)
    out = meta_like(tensor)
    dim = placements[sharded[0]].dim
    for writer in sorted(w for w in writers if w in members):
        received = _gather_pieces(tensor, dim, group, members, writer, me)
        if received is not None:
            out = received
    return out


def _gather_pieces(
    tensor: DTensor,
    dim: int,
    group: dist.ProcessGroup,
    members: list[int],
    writer: int,
    me: int,
) -> torch.Tensor | None:
    """The full ``tensor``, sharded along ``dim``, on ``writer`` (None elsewhere), one piece
    at a time."""
    local = tensor.to_local()
    length, size = tensor.shape[dim], len(members)
    chunk = -(-length // size)
    spans = [(c * chunk, max(0, min(chunk, length - c * chunk))) for c in range(size)]
    if me != writer:
        _, count = spans[members.index(me)]
        if count:
            dist.send(local.contiguous(), dst=writer, group=group)
        return None
    full = torch.empty(tuple(tensor.shape), dtype=local.dtype, device="cpu")
    for member, (start, count) in zip(members, spans):
        if not count:
            continue
        target = full.narrow(dim, start, count)
        if member == me:
            target.copy_(local)
        elif local.device.type == "cpu" and target.is_contiguous():
            dist.recv(target, src=member, group=group)
        else:
            shape = list(tensor.shape)
            shape[dim] = count
            piece = torch.empty(shape, dtype=local.dtype, device=local.device)
            dist.recv(piece, src=member, group=group)
            target.copy_(piece)
    return full


def deliver_runs(
    runs: list[tuple[torch.Tensor, int]],
    shape: tuple[int, ...],
    writers: Collection[int],
    me: int,
    group: dist.ProcessGroup,
    max_runs: int,
) -> torch.Tensor:
    """The fp32 tensor of ``shape`` whose elements this rank holds as ``runs`` (flat pieces
    and where each starts in the flattened tensor; every element on exactly one rank, at most
    ``max_runs`` runs per rank) in full on each global rank in ``writers`` (host memory), a
    meta tensor elsewhere. Collective over ``group``."""
    runs = [(piece, start) for piece, start in runs if piece.numel()]
    wire = collective_device(group, runs[0][0].device if runs else torch.device("cpu"))
    layout = torch.zeros(2 * max_runs, dtype=torch.int64)
    for i, (piece, start) in enumerate(runs):
        layout[2 * i], layout[2 * i + 1] = start, piece.numel()
    layout = layout.to(wire)
    members = dist.get_process_group_ranks(group)
    out = torch.empty(shape, dtype=torch.float32, device="meta")
    for writer in sorted(writers):
        if me != writer:
            dist.gather(layout, None, dst=writer, group=group)
            for piece, _ in runs:
                dist.send(piece.to(wire).contiguous(), dst=writer, group=group)
            continue
        everyone = [torch.empty_like(layout) for _ in members]
        dist.gather(layout, everyone, dst=writer, group=group)
        held = {
            member: [(int(t[2 * i]), int(t[2 * i + 1])) for i in range(max_runs) if t[2 * i + 1]]
            for member, t in zip(members, (t.cpu() for t in everyone))
        }
        full = torch.empty(out.numel(), dtype=torch.float32, device="cpu")
        covered = 0
        for member in members:
            for k, (start, count) in enumerate(held[member]):
                target = full[start : start + count]
                if member == me:
                    target.copy_(runs[k][0])
                elif wire.type == "cpu":
                    dist.recv(target, src=member, group=group)
                else:
                    piece = torch.empty(count, dtype=full.dtype, device=wire)
                    dist.recv(piece, src=member, group=group)
                    target.copy_(piece)
                covered += count
        if covered != full.numel():
            raise RuntimeError(f"ranks hold {covered} of the tensor's {full.numel()} elements")
        out = full.view(shape)
    return out
