"""FSDP2 the way pma_dist's programs and tests apply it: each block, then the root."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def fully_shard_blocks(
    model: nn.Module, blocks: Iterable[nn.Module], mesh: Any, **options: Any
) -> nn.Module:
    """``fully_shard(block, mesh=mesh, **options)`` for each block, then for ``model``: one
    all-gather per block in forward, and every parameter a DTensor (the root's too)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model
