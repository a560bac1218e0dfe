"""The non-finite policy: a snapshot with NaN/Inf on any rank is skipped by every rank alike,
raised on, or (after ``max_consecutive_skips`` in a row) reported as the broken run it is."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from . import comm
from .backends import Backend
from .config import PMAConfig
from .errors import NonFiniteSnapshotError
from .kernels import all_finite

log = logging.getLogger("pma_dist")


class NonFiniteGuard:
    """Decides whether a snapshot is taken; counts the skipped ones."""

    def __init__(self, config: PMAConfig, group: dist.ProcessGroup | None) -> None:
        self.config = config
        self.group = group
        self.num_skipped = 0
        """Snapshots left out because some rank's shard held NaN/Inf."""
        self.streak = 0
        """Non-finite snapshots in a row (reset by a good one)."""

    def admit(self, real: list[torch.Tensor], backend: Backend, where: str) -> bool:
        """True when the snapshot of ``real`` (this rank's real elements) is finite on every
        rank; False when it is skipped; raises when the policy or the streak says so. Collective
        unless ``on_nonfinite = "ignore"``."""
        if self.config.on_nonfinite == "ignore" or comm.all_true(all_finite(real), self.group):
            self.streak = 0
            return True
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
            log.warning("PMA snapshot at %s skipped: NaN/Inf on at least one rank", where)
            return False
        # Every rank is here (the check is agreed): naming the culprits costs only failing runs.
        culprits = comm.gather_objects(nonfinite_names(backend), group=self.group)
        named = "; ".join(
            f"rank {rank}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for rank, names in enumerate(culprits)
            if names
        )
        raise NonFiniteSnapshotError(f"PMA snapshot at {where} holds NaN/Inf ({reason}); {named}")


def nonfinite_names(backend: Backend) -> list[str]:
    """Names of this rank's tensors with a NaN/Inf among their real elements."""
    names: list[str] = []
    with torch.no_grad():
        for shard in backend.shards():
            flat = shard.local.view(-1)
            for f in shard.fragments:
                part = flat[f.local_start : f.local_start + f.numel]
                if f.param not in names and not bool(torch.isfinite(part).all()):
                    names.append(f.param)
    return names
