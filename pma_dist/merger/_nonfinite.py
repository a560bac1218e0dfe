"""The non-finite policy: a snapshot with NaN/Inf on any rank is left out by every rank alike,
raised on, or (after ``max_consecutive_skips`` in a row) reported as the broken run it is.

Window snapshots are judged late: each rank's verdict on the slot it just wrote stays on the
device (:meth:`NonFiniteGuard.hold`), and the ranks agree on all verdicts held in one small
collective (:meth:`NonFiniteGuard.agree`) when the slots are about to be read (merge, swap,
export, save) and at least once a window. Running snapshots are judged before they are folded
in, since a NaN folded into a running average cannot be taken out again: the ranks' verdict is
agreed by a scalar all-reduce and the fold is guarded by it on the device
(:meth:`NonFiniteGuard.judge`); the host learns it at the next agreement, as in window mode.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .. import _comm as comm
from ..backends import Backend
from ..config import PMAConfig
from ..core import AveragingState
from ..errors import NonFiniteSnapshotError
from ..kernels import Tensors, all_finite

log = logging.getLogger("pma_dist")


class NonFiniteGuard:
    """Decides which snapshots merges may use; counts the ones left out."""

    def __init__(self, config: PMAConfig, group: dist.ProcessGroup | None) -> None:
        self.config = config
        self.group = group
        self.num_skipped = 0
        """Snapshots left out because some rank's shard held NaN/Inf (agreed so far)."""
        self.streak = 0
        """Non-finite snapshots in a row (reset by a good one)."""
        self.pending: list[tuple[int, torch.Tensor]] = []
        """``(seq, this rank's flag)`` of window snapshots written but not yet agreed on."""

    @property
    def checking(self) -> bool:
        """Whether snapshots are checked at all (``on_nonfinite`` is not ``"ignore"``)."""
        return self.config.on_nonfinite != "ignore"

    def judge(self, live: Tensors) -> torch.Tensor | None:
        """This running snapshot's verdict, agreed by every rank and left on the device: one
        scalar all-reduce, no host sync (None when not checking). Settled by :meth:`agree`."""
        if not self.checking:
            return None
        return comm.all_true_on_device(all_finite(live), self.group)

    def hold(self, seq: int, flag: torch.Tensor | None) -> None:
        """Keep a verdict on snapshot ``seq`` (this rank's, or already agreed) for the next
        :meth:`agree`."""
        if flag is not None:
            self.pending.append((seq, flag))

    def agree(self, state: AveragingState, backend: Backend) -> None:
        """Make every rank agree on the snapshots held: one small all-reduce (nothing when none
        is held, as on every rank alike). A snapshot non-finite on any rank is rejected from
        ``state`` on every rank (all of them, before raising as the policy says)."""
        if not self.pending:
            return
        state.wait_host()  # verdicts found on the host are in their flags
        seqs = [seq for seq, _ in self.pending]
        flags = [flag.to(self.pending[0][1].device) for _, flag in self.pending]
        self.pending = []
        error = None
        for seq, finite in zip(seqs, comm.all_true_each(torch.stack(flags), self.group)):
            if finite:
                self.streak = 0
                continue
            rejected = state.reject(seq)
            if rejected is None:
                continue
            record, held = rejected
            try:
                where = f"step {record.step}, {record.tokens} tokens"
                self._refuse(where, held, backend)
            except NonFiniteSnapshotError as err:
                error = error or err
        state.settle()
        if error is not None:
            raise error

    def _refuse(self, where: str, tensors: Tensors | None, backend: Backend) -> None:
        """Count a non-finite snapshot, or raise when the policy or the streak says so; the
        error names the tensors of ``tensors`` (shaped like the shard; the live shards when no
        slot holds the snapshot) that hold NaN/Inf."""
        limit = self.config.max_consecutive_skips
        if self.config.on_nonfinite == "raise":
            reason = "pma.on_nonfinite = 'raise'"
        elif limit is not None and self.streak + 1 >= limit:
            reason = (
                f"{self.streak + 1} snapshots in a row were non-finite, "
                f"pma.max_consecutive_skips = {limit}: the run has no usable average"
            )
        else:
            self.num_skipped += 1
            self.streak += 1
            log.warning("PMA snapshot at %s left out: NaN/Inf on at least one rank", where)
            return
        # Every rank is here (the verdict is agreed): naming the culprits costs only failing runs.
        live = tensors is None
        if live:
            tensors = [s.local for s in backend.shards()]
        culprits = comm.gather_objects(nonfinite_names(backend, tensors), group=self.group)
        named = "; ".join(
            f"rank {rank}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for rank, names in enumerate(culprits)
            if names
        )
        if live:
            named = (
                f"NaN/Inf in the live weights now: {named}"
                if named
                else "the live weights hold no NaN/Inf any more, so the tensors cannot be named"
            )
        raise NonFiniteSnapshotError(f"PMA snapshot at {where} holds NaN/Inf ({reason}); {named}")


def nonfinite_names(backend: Backend, tensors: Tensors) -> list[str]:
    """Names of the tensors with a NaN/Inf among the real elements of ``tensors``, which are
    shaped like this rank's shards (the live shards, or a slot holding a copy of them)."""
    names: list[str] = []
    with torch.no_grad():
        for shard, tensor in zip(backend.shards(), tensors):
            flat = tensor.view(-1)
            for f in shard.fragments:
                part = flat[f.local_start : f.local_start + f.numel]
                if f.param not in names and not bool(torch.isfinite(part).all()):
                    names.append(f.param)
    return names
