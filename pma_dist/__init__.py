"""pma_dist: online, shard-local pre-trained model averaging (PMA) for distributed training."""

from .config import PMAConfig, PMAConfigError
from .errors import NonFiniteSnapshotError, PMAStateError
from .merger import Merger

__all__ = ["Merger", "PMAConfig", "PMAConfigError", "PMAStateError", "NonFiniteSnapshotError"]
__version__ = "0.1.0"
