"""``from pma_dist.accelerate import attach``: PMA for Hugging Face Accelerate users.

See :mod:`pma_dist.integrations.accelerate`.
"""

from .integrations.accelerate import attach, detach

__all__ = ["attach", "detach"]
