"""The engine-free core: when a snapshot is due, what each slot holds, how snapshots are
weighted, and the averaging state of one shard. No process group, no engine: every piece runs
on plain tensors in a unit test.

* :class:`SnapshotSchedule` (``_schedule``): token or step intervals on a fixed grid.
* :class:`SlotRecord` and the orders it implies (``_records``).
* :class:`MergeSpec` (``_spec``): which held snapshots a merge uses, how it weighs them.
* :func:`window_weights`, :func:`decay_weights`, :func:`resolve_weights`,
  :func:`running_weight` (``_weights``): SMA, WMA, EMA and decay-shaped weights.
* :class:`AveragingState` (``_slots``) and its two kinds, :class:`WindowAverage` and
  :class:`RunningAverage` (``_averages``), and :class:`CompressedWindow` (``_compressed``: a
  base and coded differences); :func:`state_for` builds the one a config asks for.
"""

from ._averages import RunningAverage, WindowAverage, state_for
from ._compressed import CompressedWindow, chain_of, merge_terms
from ._records import (
    SlotRecord,
    merge_order,
    next_slot,
    records_from_lists,
    records_to_lists,
    ring_order,
)
from ._schedule import SnapshotSchedule, lacks_token_source
from ._slots import AveragingState
from ._spec import MergeSpec
from ._weights import DECAYS, decay_weights, resolve_weights, running_weight, window_weights

__all__ = [
    "DECAYS",
    "AveragingState",
    "CompressedWindow",
    "MergeSpec",
    "RunningAverage",
    "SlotRecord",
    "SnapshotSchedule",
    "WindowAverage",
    "chain_of",
    "decay_weights",
    "lacks_token_source",
    "merge_terms",
    "merge_order",
    "next_slot",
    "records_from_lists",
    "records_to_lists",
    "resolve_weights",
    "ring_order",
    "running_weight",
    "state_for",
    "window_weights",
]
