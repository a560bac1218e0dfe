"""Backend for models whose every rank holds whole parameters: a plain module, DDP, or one GPU."""

from __future__ import annotations

import torch
from torch import nn

from .base import Fragment, Shard, canonical_name


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


class PlainBackend:
    """Every rank holds every parameter; replicas (DDP) average identically without talking."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._params = trainable_parameters(model, optimizer)

    def shards(self) -> list[Shard]:
        return [
            Shard(
                n,
                p.detach(),
                tuple(p.shape),
                _identity,
                (Fragment(n, tuple(p.shape), 0, p.numel()),),
            )
            for n, p in self._params
        ]

    def begin_write(self) -> None:
        pass

    def end_write(self) -> None:
        pass
