"""What each slot of a window holds: :class:`SlotRecord`, and the order the records imply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SlotRecord:
    """What a slot holds: which snapshot, taken when, and whether merges may use it."""

    seq: int
    """0-based number of the snapshot among all taken (orders the slots, oldest first)."""
    step: int
    """Optimizer steps seen when it was taken."""
    tokens: int
    """Tokens seen when it was taken."""
    valid: bool = True
    """False once dropped (e.g. taken after a loss spike that was rolled back)."""

    def to_list(self) -> list:
        return [self.seq, self.step, self.tokens, self.valid]

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> SlotRecord:
        seq, step, tokens, valid = values
        return cls(int(seq), int(step), int(tokens), bool(valid))


def records_to_lists(records: Sequence[SlotRecord | None]) -> list[list | None]:
    """Records in the plain form saved states hold."""
    return [r.to_list() if r is not None else None for r in records]


def records_from_lists(values: Sequence[Sequence[Any] | None]) -> list[SlotRecord | None]:
    """Records from :func:`records_to_lists` output."""
    return [SlotRecord.from_list(v) if v is not None else None for v in values]


def merge_order(records: Sequence[SlotRecord | None]) -> list[int]:
    """Physical slots of the valid records, oldest snapshot first: the order merges read."""
    valid = [k for k, r in enumerate(records) if r is not None and r.valid]
    return sorted(valid, key=lambda k: records[k].seq)


def next_slot(records: Sequence[SlotRecord | None]) -> int:
    """Where the next snapshot goes: an empty or dropped slot, else the oldest one."""
    for k, record in enumerate(records):
        if record is None or not record.valid:
            return k
    return min(range(len(records)), key=lambda k: records[k].seq)


def ring_order(count: int, head: int, window: int) -> list[int]:
    """Physical slots of a ring of ``window`` holding ``count`` snapshots, oldest first;
    ``head`` is the slot the next snapshot will overwrite."""
    if count < window:
        return list(range(count))
    return [(head + i) % window for i in range(window)]
