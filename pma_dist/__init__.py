"""pma_dist: online, shard-local pre-trained model averaging (PMA) for distributed training.

The public surface is this module, :mod:`pma_dist.deepspeed`, :mod:`pma_dist.accelerate`,
:mod:`pma_dist.integrations`, :mod:`pma_dist.export`, :mod:`pma_dist.testing` and the
``pma-dist`` command (:mod:`pma_dist.tools`). ``docs/architecture.md`` maps the subpackages.
"""

from .config import PMAConfig, PMAConfigError
from .core import MergeSpec
from .errors import NonFiniteSnapshotError, PMAStateError
from .merger import Merger, Selection
from .policies import (
    MergeMonitor,
    MonitorConfig,
    SpikeGuard,
    SpikeGuardConfig,
    SpikeRecoveryExhausted,
)

__all__ = [
    "MergeMonitor",
    "MergeSpec",
    "Merger",
    "MonitorConfig",
    "NonFiniteSnapshotError",
    "PMAConfig",
    "PMAConfigError",
    "PMAStateError",
    "Selection",
    "SpikeGuard",
    "SpikeGuardConfig",
    "SpikeRecoveryExhausted",
]
__version__ = "0.1.0"
