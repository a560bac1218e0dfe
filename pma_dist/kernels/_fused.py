"""The fused tensor work behind snapshots, checks and merges, on groups of tensors that share
a device and a dtype: ``torch._foreach_*`` on accelerators, cache-sized blocks on the CPU, and
chunked staging when slots live in host memory for device tensors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import _cpu as cpu_kernels
from . import _triton as triton_kernels
from ._offload import chunks

Tensors = Sequence[torch.Tensor]
Runs = tuple[tuple[int, int], ...] | None
CPU_BLOCK_NUMEL = 1 << 20
"""Elements per block of a CPU merge or checked copy (4 MiB of fp32: the block stays in cache)."""
DEVICE_BATCH_BYTES = 16 << 20
"""Bytes per batch of a checked copy on an accelerator (a fraction of a data-center GPU's L2)."""


def all_finite(tensors: Tensors) -> torch.Tensor:
    """A 0-dim float tensor: 1.0 when every element of every tensor is finite, else 0.0.

    One read of the data: a sum is finite exactly when its terms are (short of a total above
    3e38, which no trained weight reaches). Accelerators take one fused ``_foreach_norm(1)``
    per group; on CPU a plain ``sum`` per tensor is the fastest reduction torch has.
    """
    if not tensors:
        return torch.ones(())
    sums = []
    for group in device_groups(tensors):
        members = [tensors[i] for i in group]
        if members[0].device.type == "cpu":
            parts = [t.sum(dtype=torch.float32) for t in members]
        else:
            parts = torch._foreach_norm(members, 1, dtype=torch.float32)
        sums.append(torch.stack(parts).float().sum())
    device = tensors[0].device
    total = torch.stack([s.to(device) for s in sums]).sum()
    return torch.isfinite(total).float()


def copy_checked(dst: Tensors, src: Tensors) -> torch.Tensor:
    """``dst[i].copy_(src[i])`` for tensors on one device, and a 0-dim float flag on that device:
    1.0 when every copied element is finite. No host sync.

    One pass over memory. On the CPU a compiled kernel tests each element as it copies it
    (``_cpu``); without it, and for dtype pairs it lacks, the copy runs in
    blocks (views) and each block is summed right after it is written, while it is still in
    cache (see :func:`all_finite` for why a sum decides). On a GPU, tensors of 1 MiB and more
    are copied and summed by one Triton kernel (``_triton``), the rest in
    ``_foreach`` batches that fit in L2.
    """
    sums: list[torch.Tensor] = []
    finite = True
    if dst and dst[0].device.type == "cpu":
        for out, live in zip(dst, src):
            if cpu_kernels.suits(out, live):
                finite = cpu_kernels.copy_finite(out, live) and finite
                continue
            if not (out.is_contiguous() and live.is_contiguous()):
                sums.append(out.copy_(live).sum(dtype=torch.float32))
                continue
            flat_out, flat_live = out.view(-1), live.view(-1)
            for part in chunks(out.numel(), CPU_BLOCK_NUMEL):
                block = flat_out[part]
                block.copy_(flat_live[part])
                sums.append(block.sum(dtype=torch.float32))
    else:
        fused = [i for i, pair in enumerate(zip(dst, src)) if triton_kernels.suits(*pair)]
        total = None
        if fused:
            total = triton_kernels.copy_sum([dst[i] for i in fused], [src[i] for i in fused])
        if total is not None:
            sums.append(total)
            dst, src = _without(dst, fused), _without(src, fused)
        for outs, lives in _batches(dst, src, DEVICE_BATCH_BYTES):
            torch._foreach_copy_(outs, lives)
            sums.extend(torch._foreach_norm(outs, 1, dtype=torch.float32))
    device = dst[0].device if dst else "cpu"
    if not finite:
        return torch.zeros((), device=device)
    if not sums:
        return torch.ones((), device=device)
    return torch.isfinite(torch.stack(sums).sum()).float()


def _without(tensors: Tensors, indices: list[int]) -> list[torch.Tensor]:
    skip = set(indices)
    return [t for i, t in enumerate(tensors) if i not in skip]


def _batches(dst: Tensors, src: Tensors, max_bytes: int) -> Iterator[tuple[list, list]]:
    """Pairs of flat views of ``dst``/``src`` in batches of about ``max_bytes`` of ``dst`` (a
    pair of which one is not contiguous, e.g. a channels_last weight: whole)."""
    outs: list[torch.Tensor] = []
    lives: list[torch.Tensor] = []
    size = 0
    for out, live in zip(dst, src):
        if not (out.is_contiguous() and live.is_contiguous()):
            outs.append(out)
            lives.append(live)
            size += out.numel() * out.element_size()
            continue
        step = max(1, max_bytes // out.element_size())
        flat_out, flat_live = out.view(-1), live.view(-1)
        for part in chunks(out.numel(), step):
            outs.append(flat_out[part])
            lives.append(flat_live[part])
            size += outs[-1].numel() * out.element_size()
            if size >= max_bytes:
                yield outs, lives
                outs, lives, size = [], [], 0
    if outs:
        yield outs, lives


def device_groups(tensors: Tensors) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for fused foreach calls."""
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_key.setdefault((t.device, t.dtype), []).append(i)
    return list(by_key.values())


def real_views(tensors: Tensors, runs: Sequence[Runs]) -> list[torch.Tensor]:
    """``tensors`` with each padded one replaced by flat views of its real runs."""
    out: list[torch.Tensor] = []
    for tensor, spans in zip(tensors, runs):
        if spans is None:
            out.append(tensor)
        else:
            flat = tensor.view(-1)
            out.extend(flat[start : start + numel] for start, numel in spans)
    return out


def weighted_sum(outs: list[torch.Tensor], slots: list[list[torch.Tensor]], weights: list[float]):
    """``outs[i] = sum_s weights[s] * slots[s][i]`` for tensors that share a device and a dtype
    (``outs`` may have another dtype, or live on the device when the slots live on the host);
    accumulated in the slots' dtype. An ``out`` with other strides than the slots' (a
    channels_last weight) is summed into a contiguous copy first."""
    strided = [i for i, out in enumerate(outs) if not out.is_contiguous()]
    if strided:
        staged = list(outs)
        for i in strided:
            staged[i] = torch.empty(outs[i].shape, dtype=outs[i].dtype, device=outs[i].device)
        weighted_sum(staged, slots, weights)
        for i in strided:
            outs[i].copy_(staged[i])
        return
    dtype = slots[0][0].dtype
    if slots[0][0].device != outs[0].device:
        weighted_sum_staged(outs, slots, weights, dtype)
    elif outs[0].device.type == "cpu" and outs[0].dtype == dtype:
        weighted_sum_blocked(outs, slots, weights)
    else:
        acc = outs if outs[0].dtype == dtype else [torch.empty_like(s) for s in slots[0]]
        torch._foreach_copy_(acc, slots[0])
        torch._foreach_mul_(acc, weights[0])
        for slot, weight in zip(slots[1:], weights[1:]):
            torch._foreach_add_(acc, slot, alpha=weight)
        if acc is not outs:
            torch._foreach_copy_(outs, acc)


def copy_group(
    dst: list[torch.Tensor], src: list[torch.Tensor], side: Any | None, check: bool
) -> torch.Tensor | None:
    """``dst[i].copy_(src[i])`` for tensors that share a device and a dtype, on the side
    stream ``side`` (a :class:`~pma_dist.kernels.SideStreamCopy`) when the slots are on the
    host; with ``check``, a 0-dim flag on the device: 1.0 when every element is finite."""
    if side is not None:
        finite = all_finite(src) if check else None
        side.copy(dst, src)
        return finite
    if check:
        return copy_checked(dst, src)
    torch._foreach_copy_(dst, src)
    return None


def weighted_sum_blocked(
    outs: list[torch.Tensor], slots: list[list[torch.Tensor]], weights: list[float]
) -> None:
    """``outs[i] = sum_s weights[s] * slots[s][i]`` on the CPU, a cache-sized block at a time,
    so the accumulator stays in cache and each slot is read once (1.6x faster than whole-tensor
    passes for a 10-slot window)."""
    for i, out in enumerate(outs):
        flat_out = out.view(-1)
        flats = [slot[i].view(-1) for slot in slots]
        for part in chunks(out.numel(), CPU_BLOCK_NUMEL):
            acc = flat_out[part]
            acc.copy_(flats[0][part]).mul_(weights[0])
            for flat, weight in zip(flats[1:], weights[1:]):
                acc.add_(flat[part], alpha=weight)


def weighted_sum_staged(
    outs: list[torch.Tensor],
    slots: list[list[torch.Tensor]],
    weights: list[float],
    dtype: torch.dtype,
) -> None:
    """``outs[i] = sum_s weights[s] * slots[s][i]`` with slots on another device, chunk by chunk.

    Returns once the device has read the slots, so that the host may overwrite them (``load``)."""
    for i, out in enumerate(outs):
        flat_out = out.view(-1)
        flats = [slot[i].view(-1) for slot in slots]
        for part in chunks(out.numel()):
            acc = flats[0][part].to(out.device, dtype, non_blocking=True).mul_(weights[0])
            for flat, weight in zip(flats[1:], weights[1:]):
                acc.add_(flat[part].to(out.device, non_blocking=True), alpha=weight)
            flat_out[part].copy_(acc)
    if outs:
        torch.get_device_module(outs[0].device).synchronize(outs[0].device)


def lerp_group(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """``dst[i].lerp_(src[i], weight)`` for tensors that share a device and a dtype, in the
    dtype of ``dst`` (slots in host memory are staged through the device)."""
    if dst[0].device != src[0].device:
        lerp_staged(dst, src, weight)
        return
    if src[0].dtype != dst[0].dtype:
        src = [t.to(dst[0].dtype) for t in src]
    torch._foreach_lerp_(dst, src, weight)


def folds_on_host(dst: Tensors, src: Tensors) -> bool:
    """Whether :func:`fold_group` reads the verdict on the host: for slots on the CPU (where
    reading it costs nothing) and for slots in host memory staged through the device (whose
    copies back wait for the device anyway)."""
    return dst[0].device.type == "cpu" or dst[0].device != src[0].device


def fold_group(
    dst: list[torch.Tensor], src: list[torch.Tensor], weight: torch.Tensor, ok: torch.Tensor | None
) -> None:
    """``dst[i].lerp_(src[i], weight)`` where the 0-dim flag ``ok`` is 1 (or is None), and
    ``dst`` left as it is where it is 0: a NaN in ``src`` is never multiplied in. ``weight``
    and ``ok`` are tensors beside the slots; on an accelerator they are never read by the host
    (see :func:`guarded_lerp`)."""
    if folds_on_host(dst, src):
        if ok is None or bool(ok):
            lerp_group(dst, src, float(weight))
        return
    guarded_lerp(dst, src, weight, ok)


def guarded_lerp(dst: Tensors, src: Tensors, weight: torch.Tensor, ok: torch.Tensor | None) -> None:
    """:func:`fold_group` with no host sync, for tensors on one device: per batch of
    :data:`DEVICE_BATCH_BYTES` (it stays in L2), the lerp's end is ``where(ok, src, dst)``,
    so a rejected snapshot moves ``dst`` by ``weight * (dst - dst) = 0``, exactly. Slots of
    16-bit floats are lerped in float32 and rounded once, as torch's lerp with a host weight
    does (a weight rounded to 16 bits would bias every fold)."""
    narrow = dst[0].element_size() < 4
    work = torch.float32 if narrow else dst[0].dtype
    weight = weight.to(dst[0].device, work)
    keep = None if ok is None else ok.to(dst[0].device).bool()
    for outs, lives in _batches(dst, src, DEVICE_BATCH_BYTES):
        ends = [live.to(out.dtype) for out, live in zip(outs, lives)]
        if keep is not None:
            ends = [torch.where(keep, end, out) for out, end in zip(outs, ends)]
        acc = [out.to(work) for out in outs] if narrow else outs
        torch._foreach_lerp_(acc, [end.to(work) for end in ends], [weight] * len(outs))
        if narrow:
            torch._foreach_copy_(outs, acc)


def lerp_staged(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """``dst[i].lerp_(src[i], weight)`` with ``dst`` in host memory, through device chunks."""
    for slot, live in zip(dst, src):
        flat_slot, flat_live = slot.view(-1), live.view(-1)
        for part in chunks(slot.numel()):
            acc = flat_slot[part].to(live.device, non_blocking=True)
            acc.lerp_(flat_live[part].to(acc.dtype), weight)
            flat_slot[part].copy_(acc)
