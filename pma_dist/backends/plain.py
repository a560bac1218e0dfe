"""Backend for models whose every rank holds whole parameters: a plain module, DDP, or one GPU."""

from __future__ import annotations

import torch
from torch import nn

from .base import Fragment, Shard, canonical_name, floating_buffers


def trainable_parameters(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> list[tuple[str, nn.Parameter]]:
    """``(canonical name, parameter)`` for every parameter the optimizer updates.

    Without an optimizer, every parameter that requires grad. Frozen parameters never change,
    so averaging them would only cost memory.
    """
    named = [(canonical_name(n), p) for n, p in model.named_parameters()]
    if optimizer is None:
        return [(n, p) for n, p in named if p.requires_grad]
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [(n, p) for n, p in named if id(p) in updated]


def _identity(buffer: torch.Tensor) -> torch.Tensor:
    return buffer


def whole(name: str, tensor: torch.Tensor, *, buffer: bool = False) -> Shard:
    """A shard holding all of ``tensor``, saved in DCP as a plain (replicated) tensor."""
    shape = tuple(tensor.shape)
    fragments = (Fragment(name, shape, 0, tensor.numel()),)
    return Shard(name, tensor.detach(), shape, _identity, fragments, buffer)


def buffer_shards(model: nn.Module, enabled: bool) -> list[Shard]:
    """Shards for the model's persistent floating buffers (every rank holds each whole)."""
    return [whole(n, b, buffer=True) for n, b in floating_buffers(model)] if enabled else []


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

    def source(self):
        """The module's state dict as it lives, for export."""
        from .sources import ModuleSource

        return ModuleSource(self._model)

    def begin_write(self) -> None:
        pass

    def end_write(self) -> None:
        pass


def backend_for(model: nn.Module, optimizer, buffers: bool) -> PlainBackend:
    """Any model: every rank holds whole tensors."""
    from . import require_parameters

    require_parameters(model, optimizer)
    return PlainBackend(model, optimizer, buffers=buffers)
