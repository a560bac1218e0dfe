"""The replica audit compares replicas without gathering them: at 4 ranks (HSDP, 2 replica
groups of 2) a passing ``check_replicas`` gathers nothing (one shuffle of digests, one
all-reduce), and a replica that differs or a count that disagrees is still named on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import run_ranks

GATHERS = ("all_gather", "all_gather_object", "gather_object", "all_gather_into_tensor")


def _outcome(merger: Merger) -> str:
    try:
        merger.check_replicas()
    except PMAStateError as err:
        return str(err)
    return "passed"


def _audit_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.support.models import make_model

    torch.manual_seed(0)
    model = make_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")))
    merger = Merger(model, None, PMAConfig(window=2, interval_steps=1))
    for _ in range(2):
        merger.snapshot()
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in GATHERS}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)

        return call

    for name in GATHERS:
        setattr(dist, name, counting(name))
    try:
        clean = _outcome(merger)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    slot = merger._state.slots[1][0]
    if rank == 3:
        with torch.no_grad():
            slot.view(-1)[-1] += 1.0
    differing = _outcome(merger)
    if rank == 3:
        with torch.no_grad():
            slot.view(-1)[-1] -= 1.0
    if rank == 2:
        merger._guard.num_skipped += 1
    return {"clean": clean, "gathers": calls, "differing": differing, "counts": _outcome(merger)}


def test_replicas_are_compared_without_gathering() -> None:
    for rank, r in enumerate(run_ranks(_audit_worker, 4)):
        assert r["clean"] == "passed", (rank, r["clean"])
        assert r["gathers"] == [], (rank, r["gathers"])
        assert "replicas differ: ranks 1 and 3" in r["differing"], (rank, r["differing"])
        assert "ranks disagree on counts and slot records" in r["counts"], (rank, r["counts"])
