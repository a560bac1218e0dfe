"""What tells a Megatron-Core optimizer apart, and the releases the Megatron backend accepts,
without importing Megatron where it is absent."""

from __future__ import annotations

import sys
from typing import Any

from ._releases import check_release

SUPPORTED_VERSIONS = ((0, 16), (0, 17))
"""Megatron-Core releases whose distributed-optimizer layout the backend is tested against:
[0.16, 0.17)."""


def check_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless Megatron-Core's version is in :data:`SUPPORTED_VERSIONS`."""
    if version is None:
        from megatron.core import package_info

        version = package_info.__version__
    why = "the distributed optimizer's layout (main shards and their ranges)"
    install = "pip install 'pma-dist[megatron]'"
    check_release("Megatron-Core", "megatron-core", version, SUPPORTED_VERSIONS, why, install)


def is_megatron_optimizer(optimizer: Any) -> bool:
    """True for what ``get_megatron_optimizer`` returns (a ``ChainedOptimizer``) or any other
    ``MegatronOptimizer``; checked without importing Megatron when it is absent."""
    if optimizer is None or "megatron.core.optimizer" not in sys.modules:
        return False
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    return isinstance(optimizer, MegatronOptimizer)
