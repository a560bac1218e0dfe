"""What a run does with its merges while it trains, built on the :class:`~pma_dist.Merger`:

* :class:`MergeMonitor` (``_monitor``, logging through ``_monitor_log``): every K snapshots,
  rank merges from the ring on held-out data, log the figures, keep the best merge exported.
* :class:`SpikeGuard` (``_recovery``): after a loss spike, roll back to the merge of the last
  healthy snapshots instead of restarting from a checkpoint.
"""

from ._monitor import EXTENSION_NAME, MergeMonitor, MonitorConfig
from ._recovery import SpikeGuard, SpikeGuardConfig, SpikeRecoveryExhausted

__all__ = [
    "EXTENSION_NAME",
    "MergeMonitor",
    "MonitorConfig",
    "SpikeGuard",
    "SpikeGuardConfig",
    "SpikeRecoveryExhausted",
]
