"""pma_dist: online, shard-local pre-trained model averaging (PMA) for distributed training."""

from .config import PMAConfig, PMAConfigError
from .merger import Merger, NonFiniteSnapshotError, PMAStateError

__all__ = ["Merger", "PMAConfig", "PMAConfigError", "PMAStateError", "NonFiniteSnapshotError"]
__version__ = "0.1.0"
