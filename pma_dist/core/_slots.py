"""Slots holding snapshots of one shard, and what every averaging state does with them: copy
in, record, merge out. No distributed code.

A shard is a fixed list of tensors (the parameters, or the parts of them, that this rank owns).
Slots accumulate in fp32 (or the configured dtype); the tensor work is in
:mod:`pma_dist.kernels`. Each slot has a :class:`~pma_dist.core.SlotRecord`; merges read the
valid slots in snapshot order, so a slot can be dropped (a rolled-back or non-finite snapshot)
without moving data, and a slot whose weight is zero is never read. Padding no one initialized
(``runs``) is never copied or checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..kernels import (
    Runs,
    SideStreamCopy,
    Tensors,
    copy_group,
    device_groups,
    empty_slot,
    real_views,
    slot_device,
    weighted_sum,
)
from ._records import SlotRecord, merge_order, next_slot, records_from_lists, records_to_lists
from ._spec import MergeSpec
from ._weights import resolve_weights


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

    def stored(self) -> list[tuple[str, list[torch.Tensor]]]:
        """Every plane of stored tensors (one per averaged tensor) under the key a checkpoint
        keeps it by: ``slots.<k>`` for slot k."""
        return [(f"slots.{k}", slot) for k, slot in enumerate(self.slots)]

    def geometry(self) -> list[list[list[int]]] | None:
        """Per tensor, where its block scales lie (``[start, rows, row, block, exps_start]``
        per segment), for states that keep any; None here."""
        return None

    def planes(self, tensor: int) -> list[torch.Tensor]:
        """Everything stored of averaged tensor ``tensor``, plane by plane."""
        return [plane[tensor] for _, plane in self.stored()]

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

    def weights(self, spec: MergeSpec, alpha: float) -> list[float]:
        """One weight per merged snapshot, oldest first, for the merge ``spec`` asks for (see
        :func:`~pma_dist.core.resolve_weights`)."""
        return resolve_weights(len(self.logical_slots()), spec, alpha)

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
        self.wait_copied()

    def wait_copied(self) -> None:
        """Block until pending snapshots have read the shard (it may change after), whatever
        host work on them is still to come."""
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
