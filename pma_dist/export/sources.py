"""Where exported tensors come from: a live (possibly sharded) module, or files on disk.

Every source yields ``(name, full tensor)`` one tensor at a time, in a fixed order, so a
writer never holds more than the tensor in hand and the output file it is filling. For a
sharded module the iteration is collective: every rank must walk the same names.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..backends.base import Fragment, canonical_name


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict under canonical names, tensors as they live (DTensor shards
    stay sharded); nothing is copied or gathered."""
    return {canonical_name(name): t for name, t in model.state_dict(keep_vars=True).items()}


def meta_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with the global shape and dtype of each entry, for planning."""
    return {
        name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for name, t in state.items()
    }


def iter_full_tensors(
    state: dict[str, torch.Tensor], names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for ``names``; DTensors are gathered one at a time (collective)."""
    with torch.no_grad():
        for name in names:
            tensor = state[name]
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            yield name, tensor.detach()


class ModuleSource:
    """A live module whose parameters are whole tensors or DTensors (plain, DDP, FSDP2)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self.state = module_state(model)

    def meta(self) -> dict[str, torch.Tensor]:
        return meta_state(self.state)

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_full_tensors(self.state, names)


class DeepSpeedSource:
    """A DeepSpeed engine: full fp32 parameters put together from the master fragments every
    rank holds (one all-reduce per tensor; each element lives on exactly one rank), under
    global names (MoE experts numbered ``ep_rank * num_local_experts + local_id``)."""

    def __init__(self, engine) -> None:
        from .. import comm
        from ..backends.deepspeed import DeepSpeedBackend

        self.module = engine.module
        self.backend = DeepSpeedBackend(engine.module, engine.optimizer)
        local = {}
        for shard in self.backend.shards():
            for f in shard.fragments:
                local.setdefault(f.param, tuple(f.shape))
        self.shapes: dict[str, tuple[int, ...]] = {}
        for part in comm.gather_objects(local):
            for name, shape in part.items():
                self.shapes.setdefault(name, shape)
        self.buffers = {
            canonical_name(n): b
            for n, b in self.module.state_dict().items()
            if n not in _param_names(self.module)
        }

    def meta(self) -> dict[str, torch.Tensor]:
        out = {
            n: torch.empty(s, dtype=torch.float32, device="meta") for n, s in self.shapes.items()
        }
        out.update(meta_state(self.buffers))
        return out

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        import torch.distributed as dist

        from .. import comm

        shards = self.backend.shards()
        device = shards[0].local.device if shards else torch.device("cpu")
        pieces: dict[str, list[tuple[torch.Tensor, Fragment]]] = {}
        for shard in shards:
            for f in shard.fragments:
                pieces.setdefault(f.param, []).append((shard.local.view(-1), f))
        group = comm.default_group()
        with torch.no_grad():
            for name in names:
                if name in self.buffers:
                    yield name, self.buffers[name].detach()
                    continue
                full = torch.zeros(math.prod(self.shapes[name]), dtype=torch.float32, device=device)
                for flat, f in pieces.get(name, ()):
                    full[f.start : f.start + f.numel] = flat[
                        f.local_start : f.local_start + f.numel
                    ]
                if group is not None:
                    full = full.to(comm.collective_device(group, full.device))
                    dist.all_reduce(full, group=group)
                yield name, full.view(self.shapes[name])


def _param_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters(remove_duplicate=False)}


def model_source(model: nn.Module):
    """The tensor source for a live model: DeepSpeed engines read their fp32 masters."""
    from ..backends.deepspeed import is_deepspeed_engine

    return DeepSpeedSource(model) if is_deepspeed_engine(model) else ModuleSource(model)


def dcp_tensor_metadata(checkpoint: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor in a DCP checkpoint, from its metadata only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    return {
        fqn: (tuple(md.size), md.properties.dtype)
        for fqn, md in metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }


def read_dcp_tensor(checkpoint: str | Path, fqn: str, shape, dtype) -> torch.Tensor:
    """One full tensor from a DCP checkpoint, read in this process alone."""
    import torch.distributed.checkpoint as dcp

    out = {fqn: torch.empty(shape, dtype=dtype)}
    dcp.load(out, checkpoint_id=str(checkpoint), no_dist=True)
    return out[fqn]
