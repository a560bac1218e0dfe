"""The declared layout of saved averaging state, and how older layouts are read.

Version 2, the one written, holds beside the slot tensors:

* ``meta``: ``format`` (2), ``mode``, ``window``, ``running_method``, ``config``, ``names`` and
  ``shapes`` of the averaged tensors (parameters, then buffers), ``buffers`` (which of the names
  are buffers);
* counters: ``count`` (snapshots taken), ``records`` (per physical slot ``[seq, step, tokens,
  valid]`` or None, see :class:`~pma_dist.averaging.SlotRecord`), ``num_skipped``,
  ``skip_streak`` (non-finite snapshots in a row), ``schedule``; and, derived from the records
  for readers that know version 1 only, ``head`` (where the next snapshot goes) and
  ``history`` (``[step, tokens]`` of the merged snapshots, oldest first).

Version 1 had no records (the ring order came from ``count`` and ``head``), no skip streak and
no buffers. :func:`counters_v2` turns its counters into version 2; its buffers start from the
live values (the caller warns).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .averaging import SlotRecord, ring_order
from .errors import PMAStateError

FORMAT_VERSION = 2
"""The layout :meth:`Merger.state_dict` and :meth:`Merger.save` write."""
READABLE_VERSIONS = (1, 2)
"""Layouts that load."""


def check_version(version: Any, where: str) -> int:
    """``version`` as an int, or ``PMAStateError`` naming what loads."""
    if version not in READABLE_VERSIONS:
        raise PMAStateError(
            f"{where}: PMA state format {version!r}; this pma_dist reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))} (state from a newer pma_dist?)"
        )
    return int(version)


def counters_v2(state: Mapping[str, Any], version: int, num_slots: int) -> dict[str, Any]:
    """The counters of a saved state of ``version`` in the version-2 form, checked.

    ``num_slots`` is the window (or 1 in running mode) the state was saved with.
    """
    try:
        if version == 1:
            records = _records_v1(state, num_slots)
            skip_streak = 0
        else:
            records = [SlotRecord.from_list(r) if r is not None else None for r in state["records"]]
            skip_streak = int(state["skip_streak"])
        counters = {
            "count": int(state["count"]),
            "records": records,
            "num_skipped": int(state["num_skipped"]),
            "skip_streak": skip_streak,
            "schedule": dict(state["schedule"]),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise PMAStateError(f"PMA state counters are malformed or incomplete: {err!r}") from None
    if len(records) != num_slots or counters["count"] < 0 or skip_streak < 0:
        raise PMAStateError(
            f"PMA state has {len(records)} slot records and count {counters['count']}, "
            f"expected {num_slots} slots"
        )
    return counters


def _records_v1(state: Mapping[str, Any], num_slots: int) -> list[SlotRecord | None]:
    """Version 1 kept a contiguous ring: ``count`` snapshots, ``head`` the next slot, and
    ``history`` the ``(step, tokens)`` of the last ``num_slots`` of them, oldest first."""
    count, history = int(state["count"]), [tuple(h) for h in state["history"]]
    records: list[SlotRecord | None] = [None] * num_slots
    order = ring_order(count, int(state["head"]), num_slots) if count else []
    if num_slots == 1 and count:
        order = [0]
    history = history[-len(order) :] if order else []
    if len(history) != len(order):
        raise ValueError(f"history of {len(history)} snapshots for {len(order)} filled slots")
    for i, (slot, (step, tokens)) in enumerate(zip(order, history)):
        records[slot] = SlotRecord(count - len(order) + i, int(step), int(tokens))
    return records


def derived_counters(records: list[SlotRecord | None], next_slot: int) -> dict[str, Any]:
    """``head`` and ``history`` as version 1 spelled them, from the records."""
    valid = sorted((r for r in records if r is not None and r.valid), key=lambda r: r.seq)
    return {"head": next_slot, "history": [[r.step, r.tokens] for r in valid]}


def merge_order(records: list[SlotRecord | None]) -> list[int]:
    """Physical slots of the valid records, oldest snapshot first."""
    valid = [k for k, r in enumerate(records) if r is not None and r.valid]
    return sorted(valid, key=lambda k: records[k].seq)
