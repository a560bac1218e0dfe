"""Saved averaging state: one declared format, two forms, read back under any layout.

* :class:`StateHeader` (``_format``): everything a save holds beside the slot tensors, format 2
  (format 1 still loads).
* The DCP form (``_dcp``): :func:`dcp_state` / :func:`load_dcp_state`, slots laid out like their
  parameters so that ``torch.distributed.checkpoint`` reshards them.
* Per-rank files (``_rank_files``): :func:`save_files` / :func:`plan_files`, one safetensors file
  per rank and a small index (``_indexed``), the save's runs of parameter elements as series
  (``_runs``) planned without any rank seeing every rank's layout (``_layout``); the ``.pt``
  files of earlier releases (``_legacy``) still load.
* Offline readers: :class:`SavedTensors` (whole tensors from per-rank files, ``_tensors``) and
  :func:`read_entries` / :func:`read_pma_summary` (a DCP checkpoint, ``_inspect``).
* :func:`check_replicas` (``_audit``): replicas hold bit-identical state, checked without a
  gather.
"""

from ._audit import check_replicas
from ._dcp import buffers_from_live, dcp_state, load_dcp_state
from ._format import FORMAT_VERSION, READABLE_VERSIONS, StateHeader, unflatten
from ._indexed import has_index
from ._inspect import read_entries, read_pma_summary
from ._rank_files import has_files, plan_files, save_files
from ._tensors import SavedTensors

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "SavedTensors",
    "StateHeader",
    "buffers_from_live",
    "check_replicas",
    "dcp_state",
    "has_files",
    "has_index",
    "load_dcp_state",
    "plan_files",
    "read_entries",
    "read_pma_summary",
    "save_files",
    "unflatten",
]
