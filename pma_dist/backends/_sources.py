"""Full tensors of a live model, one at a time, for export: what a backend hands the writers.

A source yields ``(name, full tensor)`` in a fixed order, so a writer never holds more than the
tensor in hand and the file it is filling; for a sharded model the walk is collective (every
rank walks the same names). ``dcp_state`` is the state DCP can save as it lives (None when the
layout has no DCP form).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from ._base import canonical_name


class TensorSource(Protocol):
    """Where an export reads the model from."""

    module: nn.Module
    """The module whose architecture names the tensors (the engine's inner module)."""
    dcp_state: dict[str, torch.Tensor] | None
    """The state as it lives, for a DCP export; None when the layout has no DCP form."""

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors with each tensor's full shape and dtype, for planning."""
        ...

    def tensors(
        self, names: Iterable[str], writers: Mapping[str, Collection[int]] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, full tensor)`` for ``names``, in order. Collective where sharded. With
        ``writers`` (per name, the global ranks that write it), a source may hand the full
        tensor to those ranks only and a meta tensor of its shape to the others."""
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

    def tensors(
        self, names: Iterable[str], writers: Mapping[str, Collection[int]] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One tensor at a time: with ``writers``, each goes to its writers only
        (``_delivery``); without, DTensors are gathered on every rank."""
        from torch.distributed.tensor import DTensor  # imported when a model is exported

        from ._delivery import deliver

        me = dist.get_rank() if dist.is_initialized() else 0
        with torch.no_grad():
            for name in names:
                tensor = self.dcp_state[name]
                if writers is not None:
                    tensor = deliver(tensor, writers[name], me)
                elif isinstance(tensor, DTensor):
                    tensor = tensor.full_tensor()
                yield name, tensor.detach()
