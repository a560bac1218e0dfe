"""Loss-spike recovery with merged weights (paper §4.5): roll back to the average of the last
healthy snapshots instead of restarting from a checkpoint.

The guard watches the training loss (and, optionally, the gradient norm). A step whose loss is
non-finite or above ``factor`` times the median of the recent healthy losses is a spike; the
snapshots taken on the abandoned trajectory leave the window for good, the live weights become
the merge of those taken before it, the optimizer moments are reset (or kept), and training
continues. Every rank decides alike: the loss is averaged over the
ranks first (one scalar all-reduce per step).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch

from .. import _comm as comm
from ..backends import unwrap_optimizer
from ..config import METHODS
from ..merger import Merger

log = logging.getLogger("pma_dist")


class SpikeRecoveryExhausted(RuntimeError):
    """More spikes than ``max_recoveries``: the run needs a person, not another rollback."""


@dataclass
class SpikeGuardConfig:
    """When a step is a spike, and what a recovery does."""

    factor: float = 3.0
    """A loss above ``factor`` times the median of the recent healthy losses is a spike."""
    history: int = 20
    """How many recent healthy losses the median is taken over."""
    min_history: int = 10
    """No spike is called before this many healthy losses have been seen."""
    grad_norm_factor: float | None = None
    """Also a spike: a gradient norm above this times the median of recent healthy norms."""
    last_k: int | None = None
    """Merge the last K snapshots before the spike (None: every snapshot in the window)."""
    method: str = "sma"
    """How those snapshots are weighted (``sma``, ``wma``, ``ema`` with the Merger's
    ``ema_alpha``)."""
    reset_optimizer: bool = True
    """Clear the optimizer's state (Adam moments) after a rollback; False keeps it."""
    max_recoveries: int = 3
    """After this many recoveries a further spike raises ``SpikeRecoveryExhausted``."""

    def __post_init__(self) -> None:
        problems = []
        if not self.factor > 1:
            problems.append(f"factor = {self.factor!r}: must be > 1")
        if self.history < 1 or self.min_history < 1 or self.min_history > self.history:
            problems.append(
                f"history = {self.history!r}, min_history = {self.min_history!r}: "
                "need 1 <= min_history <= history"
            )
        if self.last_k is not None and self.last_k < 1:
            problems.append(f"last_k = {self.last_k!r}: must be a positive integer or None")
        if self.method not in METHODS:
            problems.append(f"method = {self.method!r}: must be one of {', '.join(METHODS)}")
        if self.max_recoveries < 0:
            problems.append(f"max_recoveries = {self.max_recoveries!r}: must be >= 0")
        if problems:
            raise ValueError("invalid SpikeGuardConfig: " + "; ".join(problems))


class SpikeGuard:
    """Call :meth:`observe` with each step's loss after its optimizer step (and after
    ``merger.step``). Collective."""

    def __init__(self, merger: Merger, optimizer, config: SpikeGuardConfig | None = None) -> None:
        if merger.config.running:
            raise ValueError(
                "SpikeGuard needs window mode (pma.window = N): a running average already "
                "contains the snapshots taken during the spike"
            )
        self.merger, self.optimizer = merger, optimizer
        self.config = config or SpikeGuardConfig()
        self.losses: deque[float] = deque(maxlen=self.config.history)
        self.norms: deque[float] = deque(maxlen=self.config.history)
        self.recoveries: list[dict] = []
        """What each recovery did: step, loss, threshold, snapshots merged."""

    def observe(
        self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None
    ) -> bool:
        """Record this step's loss; on a spike roll back and return True."""
        loss, grad_norm = self._global(loss, grad_norm)
        threshold = self._threshold(self.losses)
        spike = not math.isfinite(loss) or (threshold is not None and loss > threshold)
        if grad_norm is not None and self.config.grad_norm_factor is not None:
            norm_threshold = self._threshold(self.norms, self.config.grad_norm_factor)
            spike |= not math.isfinite(grad_norm) or (
                norm_threshold is not None and grad_norm > norm_threshold
            )
        if not spike:
            self.losses.append(loss)
            if grad_norm is not None:
                self.norms.append(grad_norm)
            return False
        self._recover(loss, threshold)
        return True

    def _global(self, loss, grad_norm) -> tuple[float, float | None]:
        """Loss and grad norm averaged over the ranks: one all-reduce where the loss lives and
        one host sync, so a device loss is read once per step."""
        norm = float("nan") if grad_norm is None else grad_norm
        mean_loss, mean_norm = comm.mean_over_ranks([loss, norm], self.merger.process_group)
        return mean_loss, (None if grad_norm is None else mean_norm)

    def _threshold(self, recent: deque, factor: float | None = None) -> float | None:
        if len(recent) < self.config.min_history:
            return None
        return (factor or self.config.factor) * statistics.median(recent)

    def _recover(self, loss: float, threshold: float | None) -> None:
        step = self.merger.schedule.steps_seen
        if len(self.recoveries) >= self.config.max_recoveries:
            raise SpikeRecoveryExhausted(
                f"loss spike at step {step} (loss {loss:.4g}) after "
                f"{len(self.recoveries)} recoveries (max_recoveries reached)"
            )
        # The loss of step t was computed on the weights after step t - 1: those, and every
        # snapshot from then on, belong to the abandoned trajectory and leave the window.
        dropped = self.merger.drop_snapshots(since_step=step - 1)
        healthy = self.merger.history
        if not healthy:
            raise SpikeRecoveryExhausted(
                f"loss spike at step {step}: no snapshot was taken before it"
            )
        keep = min(self.config.last_k or len(healthy), len(healthy))
        self.merger.apply(self.config.method, last=keep)
        if self.config.reset_optimizer and self.optimizer is not None:
            _reset_state(self.optimizer)
        record = {
            "step": step,
            "loss": loss,
            "threshold": threshold,
            "snapshots_merged": keep,
            "snapshot_steps": [s for s, _ in healthy[-keep:]],
            "snapshots_dropped": [s for s, _ in dropped],
        }
        self.recoveries.append(record)
        log.warning("PMA spike recovery: %s", record)


def _reset_state(optimizer) -> None:
    """Forget the optimizer's per-parameter state (moments and step counts)."""
    unwrap_optimizer(optimizer).state.clear()
