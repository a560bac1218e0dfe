"""Full tensors of a live model, one at a time, for export: what a backend hands the writers.

A source yields ``(name, full tensor)`` in a fixed order, so a writer never holds more than the
tensor in hand and the file it is filling; for a sharded model the walk is collective (every
rank walks the same names). ``dcp_state`` is the state DCP can save as it lives (None when the
layout has no DCP form).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .base import canonical_name


class TensorSource(Protocol):
    """Where an export reads the model from."""

    module: nn.Module
    """The module whose architecture names the tensors (the engine's inner module)."""
    dcp_state: dict[str, torch.Tensor] | None
    """The state as it lives, for a DCP export; None when the layout has no DCP form."""

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors with each tensor's full shape and dtype, for planning."""
        ...

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` for ``names``, in order. Collective where sharded."""
        ...


def module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict under canonical names, tensors as they live (DTensor shards
    stay sharded); nothing is copied or gathered."""
    return {canonical_name(name): t for name, t in model.state_dict(keep_vars=True).items()}


def meta_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with the global shape and dtype of each entry, for planning."""
    return {
        name: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for name, t in state.items()
    }


class ModuleSource:
    """A live module whose parameters are whole tensors or DTensors (plain, DDP, FSDP2)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self.dcp_state = module_state(model)

    def meta(self) -> dict[str, torch.Tensor]:
        return meta_state(self.dcp_state)

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """DTensors are gathered one at a time (collective over their mesh)."""
        with torch.no_grad():
            for name in names:
                tensor = self.dcp_state[name]
                if isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()
                yield name, tensor.detach()
