"""The averaging state of one shard, and the SMA/WMA/EMA math. No distributed code.

A shard is a fixed list of tensors (the parameters, or the parts of them, that this rank owns).
Two states keep averages of it, both exact:

* :class:`WindowAverage` - the paper's definition: a ring of the last N snapshots. Merged weights
  are computed from the ring when asked, so there is no running-sum drift, and any weighting of
  the same snapshots (SMA, WMA, EMA within the window, user weights) is available at merge time.
* :class:`RunningAverage` - one slot, and every snapshot is one ``lerp`` with a scalar weight:
  cumulative SMA 1/k, cumulative WMA 2/(k+1), EMA alpha (1 for the first snapshot).

Slots accumulate in fp32 (or the configured dtype); the tensor work is in :mod:`.kernels`. Each
slot has a :class:`SlotRecord`; merges read the valid slots in snapshot order, so a slot can be
dropped (a rolled-back or non-finite snapshot) without moving data, and a slot whose weight is
zero is never read. Padding no one initialized (``runs``) is never copied or checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .config import PMAConfig
from .kernels import (
    Runs,
    Tensors,
    copy_group,
    device_groups,
    fold_group,
    real_views,
    weighted_sum,
)
from .offload import SideStreamCopy, empty_slot, slot_device
from .records import (
    SlotRecord,
    merge_order,
    next_slot,
    records_from_lists,
    records_to_lists,
)
from .weights import resolve_weights, running_weight


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
        runs: Sequence[Runs] | None = None,
    ) -> None:
        self.dtype = dtype
        self.shapes = [tuple(t.shape) for t in like]
        self.runs: list[Runs] = list(runs) if runs is not None else [None] * len(like)
        """Per tensor, the ``(start, numel)`` runs of real elements, or None for all of it."""
        self.slots: list[list[torch.Tensor]] = [
            [empty_slot(t, dtype, slot_device(t.device, offload)) for t in like]
            for _ in range(num_slots)
        ]
        self.records: list[SlotRecord | None] = [None] * num_slots
        """Per physical slot, the snapshot it holds (None while empty)."""
        self.count = 0
        """Snapshots folded in so far (less any found non-finite afterwards)."""
        self.next_seq = 0
        """The ``seq`` of the next snapshot: more than any record's."""
        self._groups = device_groups(like)
        self._real_groups = device_groups(self.real(like))
        self._side_copies = {
            t.device: SideStreamCopy(t.device)
            for t in like
            if t.device.type != "cpu" and slot_device(t.device, offload).type == "cpu"
        }

    @property
    def nbytes(self) -> int:
        """Bytes the slots take (padding included)."""
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot)

    def real(self, tensors: Tensors) -> list[torch.Tensor]:
        """The real (unpadded) elements of ``tensors`` (shaped like the shard) as views."""
        return real_views(tensors, self.runs)

    def snapshot(self, tensors: Tensors, step: int = 0, tokens: int = 0) -> torch.Tensor | None:
        """Fold ``tensors`` (shaped like the shard), taken at ``step``/``tokens``, in."""
        raise NotImplementedError

    def logical_slots(self) -> list[int]:
        """Indices of the valid filled slots, oldest snapshot first."""
        return merge_order(self.records)

    def merged_records(self) -> list[SlotRecord]:
        """The records of :meth:`logical_slots`, oldest first."""
        return [self.records[k] for k in self.logical_slots()]

    def weights(
        self,
        method: str,
        alpha: float,
        weights: Sequence[float] | None = None,
        last: int | None = None,
        stride: int | None = None,
    ) -> list[float]:
        """One weight per merged snapshot, oldest first (see :func:`resolve_weights`)."""
        n = len(self.logical_slots())
        return resolve_weights(n, method, alpha, weights, last, stride)

    def next_slot(self) -> int:
        """The physical slot the next snapshot is written to."""
        return next_slot(self.records)

    def state_dict(self) -> dict[str, Any]:
        """Counters and slot records (the slot tensors are saved by the caller's format)."""
        return {"count": self.count, "records": records_to_lists(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters and records from :meth:`state_dict`; checked before anything changes."""
        self.restore(int(state["count"]), records_from_lists(state["records"]))

    def restore(self, count: int, records: Sequence[SlotRecord | None]) -> None:
        """Set the counters and records that go with slots just loaded; checked first."""
        records = list(records)
        if len(records) != len(self.slots) or count < 0:
            raise ValueError(
                f"{len(records)} slot records and count {count} for a state of "
                f"{len(self.slots)} slots"
            )
        self.records, self.count = records, count
        seqs = [r.seq for r in records if r is not None]
        self.next_seq = max(seqs) + 1 if seqs else count

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Leave snapshot ``seq``, found non-finite on some rank, out of the state."""
        raise NotImplementedError

    def settle(self) -> None:
        """Every verdict taken so far has been agreed (and the bad ones rejected)."""

    def merge_into(self, out: Tensors, weights: Sequence[float]) -> None:
        """Write the weighted sum of the valid slots (oldest first) into ``out``.

        ``out`` may have any dtype; the sum is accumulated in the slot dtype first. A slot whose
        weight is zero is not read, so whatever it holds (NaN included) cannot leak in.
        """
        order = self.logical_slots()
        if not order:
            raise RuntimeError("no snapshot is held (none taken, or all dropped): nothing to merge")
        if len(weights) != len(order):
            raise ValueError(f"{len(weights)} weights for {len(order)} snapshots")
        pairs = [(k, float(w)) for k, w in zip(order, weights) if w != 0]
        if not pairs:
            raise ValueError(f"weights={list(weights)!r}: every weight is zero")
        self._check(out)
        self.wait_host()
        weights = [w for _, w in pairs]
        for group in self._groups:
            outs = [out[i] for i in group]
            weighted_sum(outs, [[self.slots[s][i] for i in group] for s, _ in pairs], weights)

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

    def _copy_into(
        self, slot: list[torch.Tensor], tensors: Tensors, check: bool = False
    ) -> torch.Tensor | None:
        """Copy the real elements of ``tensors`` into ``slot``; with ``check``, also return a
        0-dim flag (on the shard's device, no host sync): 1.0 when all of them are finite."""
        slot, tensors = self.real(slot), self.real(tensors)
        flags = []
        for group in self._real_groups:
            dst = [slot[i] for i in group]
            src = [tensors[i] for i in group]
            flags.append(copy_group(dst, src, self._side_copies.get(src[0].device), check))
        if not check:
            return None
        if not flags:
            return torch.ones(())
        return torch.stack([f.to(flags[0].device, non_blocking=True) for f in flags]).min()


class WindowAverage(AveragingState):
    """A ring of the last ``window`` snapshots; merges computed from it on demand."""

    mode = "window"

    def __init__(self, like: Tensors, window: int, **kwargs) -> None:
        super().__init__(like, window, **kwargs)
        self.window = window

    def snapshot(
        self, tensors: Tensors, step: int = 0, tokens: int = 0, check: bool = False
    ) -> torch.Tensor | None:
        """Copy ``tensors`` into the next slot; with ``check``, return this rank's verdict on
        it as a 0-dim flag left on the device (see :meth:`reject` for a slot found bad)."""
        self._check(tensors)
        self.wait_host()
        slot = self.next_slot()
        finite = self._copy_into(self.slots[slot], tensors, check)
        self.records[slot] = SlotRecord(self.next_seq, step, tokens)
        self.next_seq += 1
        self.count += 1
        return finite

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Leave snapshot ``seq`` out of every merge and of the count (found non-finite after
        it was written); its slot is reused first. Its record and that slot's tensors, or None
        if no slot holds it."""
        for k, record in enumerate(self.records):
            if record is not None and record.seq == seq and record.valid:
                self.drop([k])
                self.count -= 1
                return record, self.slots[k]
        return None

    def drop(self, slots: Sequence[int]) -> None:
        """Leave ``slots`` out of every later merge; later snapshots reuse them first."""
        for k in slots:
            record = self.records[k]
            if record is not None:
                self.records[k] = SlotRecord(record.seq, record.step, record.tokens, False)

    def drop_since(self, step: int) -> list[SlotRecord]:
        """Drop every merged snapshot taken at ``step`` or later; their records, oldest first."""
        dropped = [k for k in self.logical_slots() if self.records[k].step >= step]
        records = [self.records[k] for k in dropped]
        self.drop(dropped)
        return records


class RunningAverage(AveragingState):
    """One slot folded with a lerp per snapshot: cumulative SMA/WMA or EMA.

    A snapshot is folded in only where the ranks' agreed verdict on it says finite (a NaN
    folded in cannot be taken out), and the verdict is not read by the host: the number of
    snapshots folded, which sets the next weight, is kept beside the slot. ``count`` and the
    record count every snapshot taken until the verdicts are settled (:meth:`reject`,
    :meth:`settle`), as in window mode.
    """

    mode = "running"

    def __init__(self, like: Tensors, method: str, alpha: float = 0.2, **kwargs) -> None:
        super().__init__(like, 1, **kwargs)
        self.method = method
        self.alpha = alpha
        device = self.slots[0][0].device if like else torch.device("cpu")
        self.folded = torch.zeros((), dtype=torch.int64, device=device)
        """Snapshots folded into the slot, kept beside it (0-dim)."""
        self._settled: SlotRecord | None = None
        self._unsettled: list[SlotRecord] = []

    def weights(
        self,
        method: str,
        alpha: float,
        weights: Sequence[float] | None = None,
        last: int | None = None,
        stride: int | None = None,
    ) -> list[float]:
        chosen = (weights, last, stride)
        if any(x is not None for x in chosen) or method != self.method:
            raise ValueError(
                f"running mode (pma.window = null) keeps a single {self.method!r} average; "
                f"method={method!r}/weights/last/stride need window mode (pma.window = N)"
            )
        return [1.0]

    def next_slot(self) -> int:
        return 0

    def snapshot(
        self, tensors: Tensors, step: int = 0, tokens: int = 0, verdict: torch.Tensor | None = None
    ) -> None:
        """Fold ``tensors`` in, unless ``verdict`` (a 0-dim flag every rank agreed on, left on
        the device) is 0; the slot is then unchanged."""
        self._check(tensors)
        ok = None if verdict is None else verdict.to(self.folded.device)
        weight = running_weight(self.method, self.folded.double() + 1, self.alpha)
        slot, live = self.real(self.slots[0]), self.real(tensors)
        for group in self._real_groups:
            fold_group([slot[i] for i in group], [live[i] for i in group], weight, ok)
        self.folded += 1 if ok is None else ok.to(torch.int64)
        self.records[0] = SlotRecord(self.next_seq, step, tokens)
        self._unsettled.append(self.records[0])
        self.next_seq += 1
        self.count += 1
        if verdict is None:
            self.settle()

    def reject(self, seq: int) -> tuple[SlotRecord, Tensors | None] | None:
        """Take snapshot ``seq`` (not folded in: its verdict was 0) out of the count and the
        record. Its record (and None: no slot holds it), or None if it awaits no verdict."""
        for k, record in enumerate(self._unsettled):
            if record.seq == seq:
                del self._unsettled[k]
                self.count -= 1
                self.records[0] = self._unsettled[-1] if self._unsettled else self._settled
                return record, None
        return None

    def settle(self) -> None:
        """Every verdict so far is known: the record now is the last snapshot folded in."""
        self._settled = self.records[0]
        self._unsettled = []

    def restore(self, count: int, records: Sequence[SlotRecord | None]) -> None:
        super().restore(count, records)
        self.folded.fill_(count)
        self.settle()


def state_for(config: PMAConfig, like: Tensors, runs: Sequence[Runs]) -> AveragingState:
    """The averaging state ``config`` describes, for tensors shaped like ``like``."""
    dtype = getattr(torch, config.dtype)
    wider = sorted({str(t.dtype) for t in like if t.element_size() > dtype.itemsize})
    if wider:
        warnings.warn(
            f"pma.dtype = {config.dtype!r} is lower precision than parameters of dtype "
            f"{', '.join(wider)}; averages lose precision",
            stacklevel=4,
        )
    options = {"dtype": dtype, "offload": config.offload, "runs": runs}
    if config.running:
        return RunningAverage(like, config.method, config.ema_alpha, **options)
    return WindowAverage(like, config.window, **options)
