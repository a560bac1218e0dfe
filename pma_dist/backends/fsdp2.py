"""Backend for DTensor parameters: FSDP2 ``fully_shard`` (also HSDP, and TP/FSDP meshes).

Each rank averages ``param.to_local()``, the shard FSDP2 keeps in the parameter's own dtype
(fp32 under a bf16 ``MixedPrecisionPolicy``), including uneven and empty shards. Nothing is
gathered: the checkpointed state is a DTensor laid out exactly like the parameter, so DCP
reshards it when the world size changes.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .base import Fragment, Shard
from .plain import buffer_shards, trainable_parameters


def _like_param(param: DTensor, buffer: torch.Tensor) -> DTensor:
    """``buffer`` (a slot, perhaps in host memory) as a DTensor laid out like ``param``.

    Built directly, as FSDP2 builds its CPU-offloaded parameters: ``DTensor.from_local`` would
    move a host slot onto the mesh's device, a whole slot of accelerator memory at every save.
    """
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    meta = TensorMeta(param.shape, param.stride(), buffer.dtype)
    spec = DTensorSpec(param.device_mesh, param.placements, tensor_meta=meta)
    return DTensor(buffer, spec, requires_grad=False)


def _column_sharded(param: DTensor) -> list:
    """Placements that shard ``param`` on a dimension other than 0 (tensor parallelism)."""
    from torch.distributed.tensor import Shard as ShardPlacement

    return [p for p in param.placements if isinstance(p, ShardPlacement) and p.dim != 0]


def _fragments(name: str, param: DTensor) -> tuple[Fragment, ...]:
    """The local shard as one run of the flattened parameter (row sharding or replication)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    row = math.prod(param.shape[1:])
    numel = math.prod(shape)
    return (Fragment(name, tuple(param.shape), offset[0] * row if numel else 0, numel),)


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
            if _column_sharded(param):
                raise TypeError(
                    f"FSDP2Backend: parameter {name!r} is sharded on dimension "
                    f"{_column_sharded(param)[0].dim} (placements {tuple(param.placements)}, "
                    f"mesh {param.device_mesh.mesh_dim_names or param.device_mesh.shape}); "
                    "pma_dist averages layouts whose local shard is one run of rows "
                    "(Shard(0) or Replicate on every mesh dimension), so tensor parallelism "
                    "that splits columns (RowwiseParallel weights, say) is not supported"
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
                )
                for n, p in self._parameters()
            ] + buffer_shards(self._model, self._buffers)

    def source(self):
        """The module's state dict as it lives, for export."""
        from .sources import ModuleSource

        return ModuleSource(self._model)

    def begin_write(self) -> None:
        """Free unsharded parameters so that the next forward all-gathers the written shards."""
        self._reshard()

    def end_write(self) -> None:
        pass


def backend_for(model: nn.Module, optimizer, buffers: bool) -> FSDP2Backend | None:
    """Models that ``fully_shard`` wrapped, or whose parameters are DTensors."""
    from torch.distributed.fsdp import FSDPModule

    from . import require_parameters

    params = require_parameters(model, optimizer)
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    if sharded or any(isinstance(p, DTensor) for _, p in params):
        return FSDP2Backend(model, optimizer, buffers=buffers)
    return None
