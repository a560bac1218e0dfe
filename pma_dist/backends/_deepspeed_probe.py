"""What tells a DeepSpeed engine or ZeRO optimizer apart, and the DeepSpeed releases the backend
accepts, without importing DeepSpeed (nor what its backend imports) where it is absent."""

from __future__ import annotations

import sys

from ._optimizers import optimizer_chain
from ._releases import check_release

SUPPORTED_VERSIONS = ((0, 19), (0, 20))
"""DeepSpeed releases whose private layout this backend is tested against: [0.19, 0.20)."""


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless DeepSpeed's version is in :data:`SUPPORTED_VERSIONS`."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    low, high = SUPPORTED_VERSIONS
    pin = f"deepspeed>={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    why = "DeepSpeed's private optimizer layout"
    check_release(
        "DeepSpeed", "deepspeed", version, SUPPORTED_VERSIONS, why, f"pip install '{pin}'"
    )


def is_deepspeed_engine(model: object) -> bool:
    """True for a ``DeepSpeedEngine`` (checked without importing DeepSpeed when it is absent)."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def zero_optimizer_of(optimizer: object):
    """The ZeRO optimizer inside ``optimizer`` (itself, or under wrappers such as Accelerate's
    ``DeepSpeedOptimizerWrapper``), or None."""
    chain = optimizer_chain(optimizer)
    return next((o for o in chain if any(hasattr(o, a) for a in _MASTER_ATTRIBUTES)), None)


_MASTER_ATTRIBUTES = (
    "fp32_partitioned_groups_flat",
    "single_partition_of_fp32_groups",
    "fp32_groups_flat_partition",
)
