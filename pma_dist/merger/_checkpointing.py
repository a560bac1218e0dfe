"""The checkpoint side of the :class:`~pma_dist.Merger`: a DCP ``Stateful``, per-rank state
files, and the replica audit, over one :class:`~pma_dist.state.StateHeader`.

A mixin, so that the public object keeps one flat API while each concept lives in its own
module; it reads the Merger's parts and never reaches past them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from ..backends import Backend
from ..config import PMAConfig
from ..core import AveragingState, SnapshotSchedule
from ..state import (
    StateHeader,
    buffers_from_live,
    dcp_state,
    load_dcp_state,
    plan_files,
    save_files,
)
from ..state import (
    check_replicas as audit_replicas,
)
from ._nonfinite import NonFiniteGuard


class Extension(Protocol):
    """An object whose state is saved and restored with a Merger's (a merge monitor)."""

    def state_dict(self) -> dict[str, Any]:
        """Its state as JSON-serializable values, the same on every rank."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointing:
    """Saving, loading and auditing the averaging state of a Merger."""

    config: PMAConfig
    backend: Backend
    schedule: SnapshotSchedule
    process_group: dist.ProcessGroup | None
    names: list[str]
    global_shapes: list[list[int]]
    buffer_names: list[str]
    _state: AveragingState
    _guard: NonFiniteGuard
    _checked_load: tuple[Path, Any] | None = None
    """What :meth:`check_saved` read, for the :meth:`load` of the same directory that follows."""
    _extensions: dict[str, Extension]
    _unclaimed: dict[str, Any]
    """Extension states loaded before their extension was added, by name."""

    def agree(self) -> None:
        raise NotImplementedError

    def add_extension(self, name: str, extension: Extension) -> None:
        """Save and restore ``extension``'s state with this Merger's under ``name``; a state of
        that name already loaded is handed to it now. Undo with :meth:`remove_extension`."""
        if name in self._extensions:
            raise ValueError(f"Merger already has an extension named {name!r}")
        self._extensions[name] = extension
        if name in self._unclaimed:
            extension.load_state_dict(self._unclaimed.pop(name))

    def remove_extension(self, name: str) -> None:
        """Stop saving the extension ``name``."""
        self._extensions.pop(name, None)

    def header(self) -> StateHeader:
        """What a save of this state holds beside the slots."""
        tensors = (self.names, self.global_shapes, self.buffer_names)
        counts = {"num_skipped": self._guard.num_skipped, "skip_streak": self._guard.streak}
        schedule = self.schedule.state_dict()
        extensions = {name: ext.state_dict() for name, ext in self._extensions.items()}
        return StateHeader.describe(
            self.config, self._state, *tensors, schedule=schedule, extensions=extensions, **counts
        )

    def state_dict(self) -> dict[str, Any]:
        """The averaging state (format 2, :mod:`pma_dist.state`) for DCP: slots laid out
        like their parameters, buffers as replicated tensors. Collective (:meth:`agree`)."""
        self.agree()
        return dcp_state(self.backend, self._state, self.header())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; validated in full before anything changes.
        A format-1 state loads too (its buffers start from the live values, with a warning);
        DCP reads one only with ``planner=DefaultLoadPlanner(allow_partial_load=True)``."""
        self._restore(load_dcp_state(state, self._state, self.header()))

    def save(self, directory: str | Path) -> Path:
        """Write the averaging state as one file per rank under ``directory``. Collective. The
        files describe slots as runs of parameter elements: :meth:`load` reshards them."""
        self.agree()
        self._checked_load = None
        return save_files(
            Path(directory), self.backend, self._state, self.header(), self.process_group
        )

    def load(self, directory: str | Path) -> None:
        """Resume from :meth:`save` output written under any layout; checked in full (settings,
        parameter names and shapes, every element covered, checksums) before anything changes.
        Each rank reads only the saved chunks that hold its share."""
        checked, self._checked_load = self._checked_load, None
        if checked is not None and checked[0] == Path(directory).resolve():
            plan = checked[1]
        else:
            plan = plan_files(Path(directory), self.backend, self.header(), self._state)
        plan.apply(self._state)
        self._restore(plan.header)

    def check_saved(self, directory: str | Path) -> None:
        """Raise ``PMAStateError`` unless :meth:`load` would succeed; changes nothing. What it
        read is kept for a :meth:`load` of the same directory that follows, so checking first
        (as the DeepSpeed integration does before the engine loads) reads the state once."""
        plan = plan_files(Path(directory), self.backend, self.header(), self._state)
        self._checked_load = (Path(directory).resolve(), plan)

    def check_replicas(self) -> None:
        """Raise ``PMAStateError`` on every rank unless all ranks agree on the counts and every
        replica (DDP/HSDP, buffers) holds bit-identical state. Collective."""
        self.agree()
        counts = (self._state.count, self._guard.num_skipped)
        audit_replicas(self.backend, self._state, counts, self.process_group)

    def _restore(self, saved: StateHeader) -> None:
        """Counters from a checked header; buffers from live values if it saved none."""
        self._state.restore(saved.count, saved.records)
        self._guard.pending = []
        self._guard.num_skipped, self._guard.streak = saved.num_skipped, saved.skip_streak
        self.schedule.load_state_dict(saved.schedule)
        self._unclaimed = dict(saved.extensions)
        for name, extension in self._extensions.items():
            if name in self._unclaimed:
                extension.load_state_dict(self._unclaimed.pop(name))
        if saved.format == 1:
            buffers_from_live(self.backend, self._state)
