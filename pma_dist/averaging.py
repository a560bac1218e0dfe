"""The averaging state of one shard, and the SMA/WMA/EMA math. No distributed code.

A shard is a fixed list of tensors (the parameters, or the parts of them, that this rank owns).
Two states keep averages of it, both exact:

* :class:`WindowAverage` - the paper's definition: a ring of the last N snapshots. Merged weights
  are computed from the ring when asked, so there is no running-sum drift, and any weighting of
  the same snapshots (SMA, WMA, EMA within the window, user weights) is available at merge time.
* :class:`RunningAverage` - one slot, and every snapshot is one ``lerp`` with a scalar weight:
  cumulative SMA 1/k, cumulative WMA 2/(k+1), EMA alpha (1 for the first snapshot).

Slots accumulate in fp32 (or the configured dtype) whatever the dtype of the shard, and all work
is done with ``torch._foreach_*`` over groups of tensors that share a device and a dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .offload import SideStreamCopy, chunks, empty_slot, slot_device

Tensors = Sequence[torch.Tensor]
CPU_BLOCK_NUMEL = 1 << 20
"""Elements per block of a CPU merge (4 MiB of fp32: the accumulator stays in cache)."""


def window_weights(method: str, n: int, alpha: float = 0.2) -> list[float]:
    """Weights of ``n`` snapshots, oldest first, summing to one.

    SMA: 1/n each. WMA: proportional to the position i = 1..n. EMA: the paper's recursion
    M_1 = theta_1, M_i = alpha * theta_i + (1 - alpha) * M_(i-1), unrolled.
    """
    if n < 1:
        raise ValueError(f"window_weights(n={n}): at least one snapshot is needed")
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method == "ema":
        return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    raise ValueError(f"method={method!r}: must be one of sma, wma, ema")


def running_weight(method: str, k: int, alpha: float = 0.2) -> float:
    """The lerp weight that folds snapshot ``k`` (1-based) into a running average."""
    if k == 1:
        return 1.0
    if method == "sma":
        return 1.0 / k
    if method == "wma":
        return 2.0 / (k + 1)
    if method == "ema":
        return float(alpha)
    raise ValueError(f"method={method!r}: must be one of sma, wma, ema")


def ring_order(count: int, head: int, window: int) -> list[int]:
    """Physical slots of a ring of ``window`` holding ``count`` snapshots, oldest first;
    ``head`` is the slot the next snapshot will overwrite."""
    if count < window:
        return list(range(count))
    return [(head + i) % window for i in range(window)]


def normalized_weights(weights: Sequence[float], n: int) -> list[float]:
    """User weights for ``n`` snapshots (oldest first), scaled to sum to one."""
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(
            f"weights={list(weights)!r}: expected {n} weights (one per snapshot in the window, "
            "oldest first)"
        )
    total = math.fsum(values)
    if not all(math.isfinite(w) for w in values) or abs(total) < 1e-12:
        raise ValueError(f"weights={list(weights)!r}: must be finite with a non-zero sum")
    return [w / total for w in values]


def all_finite(tensors: Tensors) -> torch.Tensor:
    """A 0-dim float tensor: 1.0 when every element of every tensor is finite, else 0.0.

    One read of the data: a sum is finite exactly when its terms are (short of a total above
    3e38, which no trained weight reaches). Accelerators take one fused ``_foreach_norm(1)``
    per group; on CPU a plain ``sum`` per tensor is the fastest reduction torch has.
    """
    if not tensors:
        return torch.ones(())
    sums = []
    for group in _groups(tensors):
        members = [tensors[i] for i in group]
        if members[0].device.type == "cpu":
            parts = [t.sum(dtype=torch.float32) for t in members]
        else:
            parts = torch._foreach_norm(members, 1, dtype=torch.float32)
        sums.append(torch.stack(parts).float().sum())
    device = tensors[0].device
    total = torch.stack([s.to(device) for s in sums]).sum()
    return torch.isfinite(total).float()


def _groups(tensors: Tensors) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for fused foreach calls."""
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        by_key.setdefault((t.device, t.dtype), []).append(i)
    return list(by_key.values())


class AveragingState:
    """Slots holding snapshots of a fixed list of tensors; base of the window and running states."""

    mode = ""

    def __init__(
        self,
        like: Tensors,
        num_slots: int,
        *,
        dtype: torch.dtype = torch.float32,
        offload: str = "none",
    ) -> None:
        self.dtype = dtype
        self.shapes = [tuple(t.shape) for t in like]
        self.slots: list[list[torch.Tensor]] = [
            [empty_slot(t, dtype, slot_device(t.device, offload)) for t in like]
            for _ in range(num_slots)
        ]
        self.count = 0
        """Snapshots folded in so far."""
        self._groups = _groups(like)
        self._side_copies = {
            t.device: SideStreamCopy(t.device)
            for t in like
            if t.device.type != "cpu" and slot_device(t.device, offload).type == "cpu"
        }

    def snapshot(self, tensors: Tensors) -> None:
        """Fold ``tensors`` (shaped like the shard) into the state."""
        raise NotImplementedError

    def logical_slots(self) -> list[int]:
        """Indices of the filled slots, oldest snapshot first."""
        raise NotImplementedError

    def merge_into(self, out: Tensors, weights: Sequence[float]) -> None:
        """Write the weighted sum of the filled slots (oldest first) into ``out``.

        ``out`` may have any dtype; the sum is accumulated in the slot dtype first.
        """
        if self.count == 0:
            raise RuntimeError("no snapshot has been taken yet: nothing to merge")
        order = self.logical_slots()
        if len(weights) != len(order):
            raise ValueError(f"{len(weights)} weights for {len(order)} snapshots")
        self._check(out)
        self.wait_host()
        pairs = list(zip(order, weights))
        for group in self._groups:
            outs = [out[i] for i in group]
            slots = [[self.slots[s][i] for i in group] for s, _ in pairs]
            if slots[0][0].device != outs[0].device:
                _weighted_sum_staged(outs, slots, [w for _, w in pairs], self.dtype)
                continue
            if outs[0].device.type == "cpu" and outs[0].dtype == self.dtype:
                _weighted_sum_blocked(outs, slots, [w for _, w in pairs])
                continue
            acc = outs if outs[0].dtype == self.dtype else [torch.empty_like(s) for s in slots[0]]
            torch._foreach_copy_(acc, slots[0])
            torch._foreach_mul_(acc, pairs[0][1])
            for slot, (_, weight) in zip(slots[1:], pairs[1:]):
                torch._foreach_add_(acc, slot, alpha=weight)
            if acc is not outs:
                torch._foreach_copy_(outs, acc)

    def wait_device(self) -> None:
        """Order the current stream after pending snapshot copies (before the shard changes)."""
        for side in self._side_copies.values():
            side.wait_device()

    def wait_host(self) -> None:
        """Block until pending snapshot copies into host slots have finished."""
        for side in self._side_copies.values():
            side.wait_host()

    def _check(self, tensors: Tensors) -> None:
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != self.shapes:
            raise RuntimeError(
                "the shard changed since the averaging state was built: got "
                f"{len(shapes)} tensors, expected {len(self.shapes)}, or shapes differ "
                f"(first got {shapes[:3]}, expected {self.shapes[:3]})"
            )

    def _copy_into(self, slot: list[torch.Tensor], tensors: Tensors) -> None:
        for group in self._groups:
            dst = [slot[i] for i in group]
            src = [tensors[i] for i in group]
            side = self._side_copies.get(src[0].device)
            if side is not None:
                side.copy(dst, src)
            else:
                torch._foreach_copy_(dst, src)


class WindowAverage(AveragingState):
    """A ring of the last ``window`` snapshots; merges computed from it on demand."""

    mode = "window"

    def __init__(self, like: Tensors, window: int, **kwargs) -> None:
        super().__init__(like, window, **kwargs)
        self.window = window
        self.head = 0
        """Physical slot the next snapshot goes to (the oldest one once the ring is full)."""

    def snapshot(self, tensors: Tensors) -> None:
        self._check(tensors)
        self.wait_host()
        self._copy_into(self.slots[self.head], tensors)
        self.head = (self.head + 1) % self.window
        self.count += 1

    def logical_slots(self) -> list[int]:
        return ring_order(self.count, self.head, self.window)


class RunningAverage(AveragingState):
    """One slot folded with a lerp per snapshot: cumulative SMA/WMA or EMA."""

    mode = "running"

    def __init__(self, like: Tensors, method: str, alpha: float = 0.2, **kwargs) -> None:
        super().__init__(like, 1, **kwargs)
        self.method = method
        self.alpha = alpha

    def snapshot(self, tensors: Tensors) -> None:
        self._check(tensors)
        weight = running_weight(self.method, self.count + 1, self.alpha)
        slot = self.slots[0]
        if weight == 1.0:
            self._copy_into(slot, tensors)
            self.wait_host()
        else:
            for group in self._groups:
                dst = [slot[i] for i in group]
                src = [tensors[i] for i in group]
                if dst[0].device != src[0].device:
                    _lerp_staged(dst, src, weight)
                    continue
                if src[0].dtype != self.dtype:
                    src = [t.to(self.dtype) for t in src]
                torch._foreach_lerp_(dst, src, weight)
        self.count += 1

    def logical_slots(self) -> list[int]:
        return [0] if self.count else []


def _weighted_sum_blocked(
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


def _weighted_sum_staged(
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


def _lerp_staged(dst: list[torch.Tensor], src: list[torch.Tensor], weight: float) -> None:
    """``dst[i].lerp_(src[i], weight)`` with ``dst`` in host memory, through device chunks."""
    for slot, live in zip(dst, src):
        flat_slot, flat_live = slot.view(-1), live.view(-1)
        for part in chunks(slot.numel()):
            acc = flat_slot[part].to(live.device, non_blocking=True)
            acc.lerp_(flat_live[part].to(acc.dtype), weight)
            flat_slot[part].copy_(acc)
