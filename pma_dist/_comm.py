"""The few collectives pma_dist needs, usable with or without an initialized process group.

Without a process group (a single process) every call degenerates to the local answer, so the
same code serves a one-GPU run, a unit test and a 1000-rank job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def default_group() -> dist.ProcessGroup | None:
    """The world group when more than one rank is running, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    group = group if group is not None else default_group()
    return dist.get_rank(group) if group is not None else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (1 without a process group)."""
    group = group if group is not None else default_group()
    return dist.get_world_size(group) if group is not None else 1


def global_rank(group_rank: int, group: dist.ProcessGroup | None = None) -> int:
    """The global rank of ``group_rank`` in ``group`` (itself without a process group)."""
    group = group if group is not None else default_group()
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def collective_device(group: dist.ProcessGroup, hint: torch.device) -> torch.device:
    """A device the group's backend can reduce on: ``hint`` unless it is CPU under NCCL-like
    backends, which need the current accelerator."""
    if hint.type != "cpu" or "gloo" in str(dist.get_backend(group)):
        return hint
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def all_true_on_device(flag: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``flag`` (a 0-dim 1.0/0.0 tensor) as 1.0 when it is 1.0 on every rank, else 0.0: one
    scalar all-reduce, queued on the device; the result stays there (no host sync)."""
    group = group if group is not None else default_group()
    value = flag.float().reshape(1)
    if group is not None:
        value = value.to(collective_device(group, value.device))
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return value.to(flag.device).reshape(())  # a blocking copy if it crosses to the host


def all_true_each(flags: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[bool]:
    """Per element of the 1-D ``flags`` (left where they were computed), whether it is nonzero
    on every rank: one all-reduce and one host sync for all of them."""
    group = group if group is not None else default_group()
    value = flags.float()
    if group is not None:
        value = value.to(collective_device(group, value.device))
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return [bool(v) for v in value.tolist()]


def mean_over_ranks(
    values: Sequence[float | torch.Tensor], group: dist.ProcessGroup | None = None
) -> list[float]:
    """The mean over ranks of each value (numbers, or 0-dim tensors left where they were
    computed), in float64: one all-reduce where the first tensor lives and one host sync."""
    group = group if group is not None else default_group()
    where = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if group is not None:
        where = collective_device(group, where)
    stacked = torch.stack(
        [
            torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v)
            .to(where, torch.float64)
            .reshape(())
            for v in values
        ]
    )
    if group is not None:
        dist.all_reduce(stacked, group=group)
        stacked /= dist.get_world_size(group)
    return stacked.tolist()


def max_over_ranks(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The largest ``value`` over the ranks of ``group``."""
    group = group if group is not None else default_group()
    if group is None:
        return value
    box = torch.tensor([value], dtype=torch.int64)
    box = box.to(collective_device(group, box.device))
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return int(box.item())


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    group = group if group is not None else default_group()
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


def gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    group = group if group is not None else default_group()
    if group is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_to_first(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on the group's first rank (None elsewhere): what the
    first rank receives grows with the world, what the others send does not."""
    group = group if group is not None else default_group()
    if group is None:
        return [obj]
    first = dist.get_global_rank(group, 0)
    mine = dist.get_rank(group) == 0
    out: list[Any] | None = [None] * dist.get_world_size(group) if mine else None
    dist.gather_object(obj, out, dst=first, group=group)
    return out


def scatter_from_first(objs: list[Any] | None, group: dist.ProcessGroup | None = None) -> Any:
    """Item r of ``objs`` (given on the group's first rank) on the group's rank r: each rank
    receives its own item only."""
    group = group if group is not None else default_group()
    if group is None:
        return objs[0]
    out: list[Any] = [None]
    first = dist.get_global_rank(group, 0)
    dist.scatter_object_list(out, objs if dist.get_rank(group) == 0 else None, first, group)
    return out[0]


def route(
    rows: torch.Tensor, destinations: Sequence[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Row i of the int64 matrix ``rows`` sent to rank ``destinations[i]``; the rows every rank
    sent here, in rank order. A rank sends its own rows and receives those routed to it (plus
    one count per rank), however large the world: a shuffle, not a gather."""
    group = group if group is not None else default_group()
    if group is None:
        return rows
    world = dist.get_world_size(group)
    order = sorted(range(len(destinations)), key=destinations.__getitem__)
    device = collective_device(group, rows.device)
    send = rows[order].to(device).contiguous()
    counts = torch.bincount(torch.tensor(destinations, dtype=torch.int64), minlength=world)
    counts = counts.to(device)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    sizes, inbound = counts.tolist(), received.tolist()
    out = torch.empty((sum(inbound), rows.shape[1]), dtype=rows.dtype, device=device)
    dist.all_to_all_single(out, send, inbound, sizes, group=group)
    return out.cpu()
