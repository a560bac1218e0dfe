"""Where exported tensors come from: a live (possibly sharded) module, or files on disk.

Every source yields ``(name, full tensor)`` one tensor at a time, in a fixed order, so a
writer never holds more than the tensor in hand and the output file it is filling. For a
sharded module the iteration is collective: every rank must walk the same names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..backends.base import canonical_name


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
