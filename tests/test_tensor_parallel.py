"""Tensor parallelism that splits columns is refused when the Merger is built, naming the
parameter and its placement, instead of failing at the first save."""

from __future__ import annotations

import torch

from pma_dist import Merger, PMAConfig
from pma_dist.testing import run_ranks


def _worker(rank: int, world_size: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        Merger(model, optimizer, PMAConfig(window=2, interval_steps=1))
    except TypeError as err:
        return str(err)
    return "accepted"


def test_column_sharded_parameters_are_refused_at_construction() -> None:
    for message in run_ranks(_worker, 2):
        assert "parameter '2.weight' is sharded on dimension 1" in message, message
        assert "Shard(dim=1)" in message and "'tp'" in message, message
