"""Backend for DTensor parameters: FSDP2 ``fully_shard`` (also HSDP, and TP/FSDP meshes).

Each rank averages ``param.to_local()``, the shard FSDP2 keeps in the parameter's own dtype
(fp32 under a bf16 ``MixedPrecisionPolicy``), including uneven and empty shards. Nothing is
gathered: the checkpointed state is a DTensor laid out exactly like the parameter, so DCP
reshards it when the world size changes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .base import Shard
from .plain import trainable_parameters


def _like_param(param: DTensor, buffer: torch.Tensor) -> DTensor:
    return DTensor.from_local(
        buffer,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


class FSDP2Backend:
    """Averages the local shards of DTensor parameters, in place."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._model = model
        self._optimizer = optimizer
        plain = [n for n, p in self._parameters() if not isinstance(p, DTensor)]
        if plain:
            raise TypeError(
                f"FSDP2Backend: parameters {plain[:3]} are not DTensors; apply fully_shard to "
                "the whole model (the root module too) before building the Merger"
            )

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
                Shard(n, p.to_local(), tuple(p.shape), functools.partial(_like_param, p))
                for n, p in self._parameters()
            ]

    def begin_write(self) -> None:
        """Free unsharded parameters so that the next forward all-gathers the written shards."""
        self._reshard()

    def end_write(self) -> None:
        pass
