"""The public object, :class:`Merger`: a thin facade over a schedule, an averaging state, a
backend and the non-finite policy.

Its sides live in their own modules, mixed into the one flat API: ``_readouts`` (swap, apply,
merged shards, export), ``_checkpointing`` (DCP ``Stateful``, per-rank files, the replica audit,
extensions), ``_nonfinite`` (which snapshots merges may use) and ``_swap`` (writing a merge into
the live tensors). ``_selection`` ranks candidate merges on held-out data through the few
readouts of :class:`Selectable`.
"""

from ..core import MergeSpec
from ._checkpointing import Extension
from ._merger import RUNNING_VERDICTS_HELD, Merger
from ._selection import GRID_METHODS, Selectable, Selection, default_candidates, select

__all__ = [
    "GRID_METHODS",
    "RUNNING_VERDICTS_HELD",
    "Extension",
    "MergeSpec",
    "Merger",
    "Selectable",
    "Selection",
    "default_candidates",
    "select",
]
