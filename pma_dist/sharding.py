"""Forwarding module, to be removed in the next release: moved to :mod:`pma_dist.tools`
(``fully_shard_blocks``)."""

import sys
import warnings

from .tools import _sharding

warnings.warn(
    "pma_dist.sharding moved to pma_dist.tools (fully_shard_blocks); "
    "the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _sharding
