"""pma_dist: online, shard-local pre-trained model averaging (PMA) for distributed training."""

from .config import PMAConfig, PMAConfigError
from .errors import NonFiniteSnapshotError, PMAStateError
from .merger import Merger
from .monitor import MergeMonitor, MonitorConfig
from .recovery import SpikeGuard, SpikeGuardConfig, SpikeRecoveryExhausted

__all__ = [
    "MergeMonitor",
    "Merger",
    "MonitorConfig",
    "NonFiniteSnapshotError",
    "PMAConfig",
    "PMAConfigError",
    "PMAStateError",
    "SpikeGuard",
    "SpikeGuardConfig",
    "SpikeRecoveryExhausted",
]
__version__ = "0.1.0"
