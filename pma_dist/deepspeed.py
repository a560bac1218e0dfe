"""``from pma_dist.deepspeed import initialize``: PMA for DeepSpeed users, enabled by config.

See :mod:`pma_dist.integrations.deepspeed`.
"""

from .integrations.deepspeed import attach, detach, initialize

__all__ = ["attach", "detach", "initialize"]
