"""Backend for models whose every rank holds whole parameters: a plain module, DDP, or one GPU."""

from __future__ import annotations

import torch
from torch import nn

from ._base import Shard
from ._params import buffer_shards, require_parameters, trainable_parameters, whole
from ._sources import ModuleSource


class PlainBackend:
    """Every rank holds every parameter; replicas (DDP) average identically without talking."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        buffers: bool = True,
    ) -> None:
        self._model = model
        self._params = trainable_parameters(model, optimizer)
        self._buffers = buffers

    def shards(self) -> list[Shard]:
        params = [whole(n, p) for n, p in self._params]
        return params + buffer_shards(self._model, self._buffers)

    def source(self) -> ModuleSource:
        """The module's state dict as it lives, for export."""
        return ModuleSource(self._model)

    def begin_write(self) -> None:
        pass

    def end_write(self) -> None:
        pass


def backend_for(model: nn.Module, optimizer, buffers: bool) -> PlainBackend:
    """Any model: every rank holds whole tensors."""
    require_parameters(model, optimizer)
    return PlainBackend(model, optimizer, buffers=buffers)
