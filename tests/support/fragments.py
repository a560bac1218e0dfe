"""Whole tensors from the fragments a PMA backend reports on every rank: how the tests read
the flat shards of DeepSpeed and Megatron as their parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def assembled(shards: Sequence, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full float32 parameters from each rank's ``tensors`` (by shard name, shaped like the
    ``shards``: their live values, or a merge of them), put together at the offsets the
    fragments give, all ranks gathered: elements held by several ranks (replicas) must agree,
    and every element of every parameter must be covered."""
    from pma_dist import _comm as comm

    local = []
    for shard in shards:
        if shard.buffer:
            continue
        flat = tensors[shard.name].detach().reshape(-1)
        for f in shard.fragments:
            piece = flat[f.local_start : f.local_start + f.numel].float().clone()
            local.append((f.param, f.shape, f.start, piece))
    full: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for part in comm.gather_objects(local):
        for name, shape, start, values in part:
            if name not in full:
                shapes[name] = tuple(shape)
                full[name] = torch.zeros(shape).view(-1)
                seen[name] = torch.zeros(full[name].numel(), dtype=torch.bool)
            piece = full[name][start : start + values.numel()]
            covered = seen[name][start : start + values.numel()]
            assert torch.equal(piece[covered], values[covered]), f"replicas of {name} differ"
            piece.copy_(values)
            covered.fill_(True)
    missing = [n for n, s in seen.items() if not bool(s.all())]
    assert not missing, f"fragments do not cover {missing}"
    return {name: flat.view(shapes[name]) for name, flat in full.items()}
