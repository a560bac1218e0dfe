"""What every backend needs of a module: the parameters the optimizer trains, and shards that
hold a whole tensor (replicated parameters, and the persistent floating buffers)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import Fragment, Shard, canonical_name, floating_buffers


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


def require_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list:
    """The trainable parameters, or a clear error when there are none."""
    params = trainable_parameters(model, optimizer)
    if not params:
        raise ValueError(
            "Merger: the model has no trainable parameters (none requires grad, or none is in "
            "the optimizer's param_groups); there is nothing to average"
        )
    return params
