"""Reading tensors back from DCP checkpoints, and the source of a live model that was not
given one (the model's backend's; see :class:`pma_dist.backends.TensorSource`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..backends import ModuleSource, TensorSource, select_backend


def model_source(model: nn.Module) -> TensorSource:
    """The export source of ``model``: its engine's (DeepSpeed engines give their fp32
    masters), or its state as it lives when it has nothing to train."""
    try:
        return select_backend(model, None, buffers=False).source()
    except ValueError:
        return ModuleSource(model)


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
