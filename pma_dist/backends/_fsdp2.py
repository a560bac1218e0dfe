"""Backend for DTensor parameters: FSDP2 ``fully_shard`` (also HSDP, and TP/FSDP meshes).

Each rank averages ``param.to_local()``, the shard FSDP2 keeps in the parameter's own dtype
(fp32 under a bf16 ``MixedPrecisionPolicy``), including uneven and empty shards. Nothing is
gathered: the checkpointed state is a DTensor laid out exactly like the parameter, so DCP
reshards it when the world size changes.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ._base import Fragment, Shard
from ._params import buffer_shards, require_parameters, trainable_parameters
from ._sources import ModuleSource


def _like_param(param: DTensor, buffer: torch.Tensor) -> DTensor:
    """``buffer`` (a slot, perhaps in host memory) as a DTensor laid out like ``param``; a
    buffer whose last dimension differs from the local shard's (per-row block scales) is laid
    out like a parameter of that last dimension, which no placement of ``param`` shards.

    Built directly, as FSDP2 builds its CPU-offloaded parameters: ``DTensor.from_local`` would
    move a host slot onto the mesh's device, a whole slot of accelerator memory at every save.
    """
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    shape, stride = param.shape, param.stride()
    local = param._local_tensor.shape
    if tuple(buffer.shape) != tuple(local):
        if buffer.dim() != param.dim() or buffer.shape[:-1] != local[:-1] or _splits_rows(param):
            raise ValueError(
                f"a buffer of shape {tuple(buffer.shape)} has no layout like a parameter of "
                f"shape {tuple(shape)} placed {tuple(param.placements)}"
            )
        shape = torch.Size((*shape[:-1], buffer.shape[-1]))
        stride = torch.empty(shape, device="meta").stride()
    meta = TensorMeta(shape, stride, buffer.dtype)
    spec = DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta)
    return DTensor(buffer, spec, requires_grad=False)


def _splits_rows(param: DTensor) -> bool:
    """Whether a placement shards ``param``'s last dimension over more than one rank (a
    ``Shard`` of it on a mesh dimension of size 1 keeps every row whole)."""
    from torch.distributed.tensor import Shard as ShardPlacement

    last, mesh = param.dim() - 1, param.device_mesh
    return param.dim() > 0 and any(
        isinstance(p, ShardPlacement) and p.dim % param.dim() == last and mesh.size(i) > 1
        for i, p in enumerate(param.placements)
    )


def _strided(param: DTensor) -> list:
    """Placements that make the local shard something other than a box of the parameter:
    ``_StridedShard`` (FSDP2 over a tensor-parallel dimension-0 shard) over more than one
    rank."""
    mesh = param.device_mesh
    return [
        p
        for i, p in enumerate(param.placements)
        if type(p).__name__ == "_StridedShard" and mesh.size(i) > 1
    ]


def _fragments(name: str, param: DTensor) -> tuple[Fragment, ...]:
    """The local shard, a box of the parameter, as runs of the flattened parameter: one run
    under row sharding or replication, one per index of the dimensions before the last split
    one otherwise (``Shard(1)`` of ``[experts, rows, cols]``: one run per expert)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    full = tuple(param.shape)
    if math.prod(shape) == 0:
        return (Fragment(name, full, 0, 0),)
    split = [d for d in range(len(full)) if shape[d] != full[d]]
    if not split:
        return (Fragment(name, full, 0, math.prod(full)),)
    last = split[-1]
    strides = [math.prod(full[d + 1 :]) for d in range(len(full))]
    run = shape[last] * strides[last]
    out = []
    for number, index in enumerate(itertools.product(*(range(n) for n in shape[:last]))):
        start = sum((offset[d] + i) * strides[d] for d, i in enumerate(index))
        start += offset[last] * strides[last]
        out.append(Fragment(name, full, start, run, number * run))
    return tuple(out)


class FSDP2Backend:
    """Averages the local shards of DTensor parameters, in place."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        buffers: bool = True,
    ) -> None:
        self._model = model
        self._optimizer = optimizer
        self._buffers = buffers
        params = self._parameters()
        plain = [n for n, p in params if not isinstance(p, DTensor)]
        if plain:
            raise TypeError(
                f"FSDP2Backend: parameters {plain[:3]} are not DTensors; apply fully_shard to "
                "the whole model (the root module too) before building the Merger"
            )
        for name, param in params:
            if _strided(param):
                raise TypeError(
                    f"FSDP2Backend: parameter {name!r} is laid out with {_strided(param)[0]} "
                    f"(placements {tuple(param.placements)}, mesh "
                    f"{param.device_mesh.mesh_dim_names or param.device_mesh.shape}): its local "
                    "shard is not a box of the parameter, which pma_dist does not average yet"
                )
        self._layout = {name: _fragments(name, param) for name, param in params}
        """Per parameter, where its local shard lies: fixed for the backend's life, and worked
        out once (DTensor's layout helpers read the mesh coordinates each time)."""

    def _parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The sharded parameters, looked up afresh: a forward with ``reshard_after_forward=False``
        (FSDP2's default at the root) leaves unsharded tensors registered until resharded."""
        self._reshard()
        return trainable_parameters(self._model, self._optimizer)

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self._model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def shards(self) -> list[Shard]:
        with torch.no_grad():
            return [
                Shard(
                    n,
                    p.to_local(),
                    tuple(p.shape),
                    functools.partial(_like_param, p),
                    self._layout.get(n) or _fragments(n, p),
                    rows_split=_splits_rows(p),
                )
                for n, p in self._parameters()
            ] + buffer_shards(self._model, self._buffers)

    def source(self):
        """The module's state dict as it lives, for export."""
        return ModuleSource(self._model)

    def begin_write(self) -> None:
        """Free unsharded parameters so that the next forward all-gathers the written shards."""
        self._reshard()

    def end_write(self) -> None:
        pass


def backend_for(model: nn.Module, optimizer, buffers: bool) -> FSDP2Backend | None:
    """Models that ``fully_shard`` wrapped, or whose parameters are DTensors."""
    from torch.distributed.fsdp import FSDPModule

    params = require_parameters(model, optimizer)
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    if sharded or any(isinstance(p, DTensor) for _, p in params):
        return FSDP2Backend(model, optimizer, buffers=buffers)
    return None
