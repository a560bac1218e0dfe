"""Forwarding module, to be removed in the next release: moved to :mod:`pma_dist.merger`
(``select``, ``Selection``, ``default_candidates``); a candidate is now a
:class:`~pma_dist.MergeSpec`, still importable here as ``Candidate``."""

import warnings

from .core import MergeSpec
from .merger import GRID_METHODS, Selectable, Selection, default_candidates, select

Candidate = MergeSpec
"""The former name of a candidate merge."""

__all__ = ["GRID_METHODS", "Candidate", "Selectable", "Selection", "default_candidates", "select"]

warnings.warn(
    "pma_dist.selection moved to pma_dist.merger (select, Selection, default_candidates; "
    "candidates are pma_dist.MergeSpec); the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
