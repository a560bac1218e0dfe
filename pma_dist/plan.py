"""Forwarding module, to be removed in the next release: moved to :mod:`pma_dist.tools`.

``pma_dist.plan`` is the moved module itself, so attributes set on it reach the code that reads
them."""

import sys
import warnings

from .tools import _plan

warnings.warn(
    "pma_dist.plan moved to pma_dist.tools (plan, describe, simulated_merger, ...); "
    "the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _plan
