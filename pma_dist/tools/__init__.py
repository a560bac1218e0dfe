"""Tools around a run: the ``pma-dist`` command (``cli``), what PMA costs one rank of a large
job worked out by the real layout code (``_plan``, with the shipped ``model_configs``), and
FSDP2 applied the way pma_dist's programs apply it (``_sharding``)."""

from ._plan import (
    SHIPPED,
    Plan,
    describe,
    fake_world,
    meta_model,
    model_config,
    plan,
    simulated_merger,
    suggested_interval_tokens,
)
from ._sharding import fully_shard_blocks

__all__ = [
    "SHIPPED",
    "Plan",
    "describe",
    "fake_world",
    "fully_shard_blocks",
    "meta_model",
    "model_config",
    "plan",
    "simulated_merger",
    "suggested_interval_tokens",
]
