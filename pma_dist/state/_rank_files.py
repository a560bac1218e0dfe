"""Per-rank files of a Merger's averaging state: runs of parameter elements that load under any
layout (DeepSpeed ZeRO stages, FSDP2, whole tensors), each rank reading only its share. Saves
are indexed (``_indexed``); the ``.pt`` files of earlier releases still load (``_legacy``).
Checked in full before anything changes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..backends import Backend
from ..core import AveragingState
from ..errors import PMAStateError
from ._format import StateHeader
from ._indexed import has_index, write_indexed
from ._indexed_load import IndexedLoad, plan_indexed
from ._legacy import FILE_GLOB, apply_copies, file_header, read_rank_files
from ._runs import Copy, SavedRuns, plan_copies


def save_files(
    directory: Path,
    backend: Backend,
    state: AveragingState,
    header: StateHeader,
    group: dist.ProcessGroup | None,
) -> Path:
    """Write one file per rank and the index under ``directory`` (``_indexed``).
    Collective. The fragments name every element, so the header leaves out the layout's own
    tensor names (ZeRO flat groups, say)."""
    header = replace(header, names=None, shapes=None)
    state.wait_host()
    shards, planes = backend.shards(), state.stored()
    return write_indexed(directory, header, shards, planes, group, state.geometry())


def has_files(directory: Path) -> bool:
    """True when ``directory`` holds per-rank PMA state: an indexed save, or the ``.pt`` files
    of earlier releases."""
    return has_index(directory) or any(Path(directory).glob(FILE_GLOB))


@dataclass
class FileLoad:
    """A checked plan to load per-rank files: nothing has changed yet."""

    files: list[dict[str, Any]]
    copies: list[Copy]
    header: StateHeader

    def apply(self, state: AveragingState) -> None:
        """Fill every slot of ``state`` from the files."""
        state.wait_host()
        with torch.no_grad():
            for k, slot in enumerate(state.slots):
                apply_copies(self.files, self.copies, k, slot)


def plan_files(
    directory: Path, backend: Backend, ours: StateHeader, state: AveragingState
) -> FileLoad | IndexedLoad:
    """Read and check what this rank needs of the save under ``directory`` (settings, every
    element of its tensors covered, checksums) without changing anything. An indexed save is
    read O(this rank's share); a save of earlier releases (``pma_rank*.pt`` files) is read
    whole."""
    if has_index(directory):
        return plan_indexed(directory, backend.shards(), ours, state)
    files = read_rank_files(directory)
    header = file_header(files[0], str(directory))
    header.check_matches(ours, str(directory))
    if ours.compression != "none":
        raise PMAStateError(
            f"{directory}: an uncompressed PMA state of an earlier release; this Merger keeps "
            f"pma.compression = {ours.compression!r}"
        )
    shards = backend.shards()
    skip = {i for i, s in enumerate(shards) if s.buffer and header.format == 1}
    return FileLoad(files, plan_copies(SavedRuns.of(files), shards, skip=skip), header)
