"""Engine backends behind one interface; :func:`select_backend` picks one for a model."""

from __future__ import annotations

import torch
from torch import nn

from .base import Backend, Shard, canonical_name
from .plain import PlainBackend, trainable_parameters

__all__ = ["Backend", "Shard", "canonical_name", "select_backend", "PlainBackend"]


def select_backend(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, buffers: bool = True
) -> Backend:
    """The backend for ``model``: DeepSpeed for an engine or a ZeRO optimizer, FSDP2 when the
    parameters are DTensors, else whole tensors. ``buffers`` averages the persistent floating
    buffers too (see :func:`~pma_dist.backends.base.floating_buffers`)."""
    from torch.distributed.tensor import DTensor

    from .deepspeed import DeepSpeedBackend, is_deepspeed_engine, zero_optimizer_of

    if is_deepspeed_engine(model):
        return DeepSpeedBackend(model.module, model.optimizer, buffers=buffers)
    zero = zero_optimizer_of(optimizer)
    if zero is not None:
        return DeepSpeedBackend(model, zero, buffers=buffers)
    params = trainable_parameters(model, optimizer)
    if not params:
        raise ValueError(
            "Merger: the model has no trainable parameters (none requires grad, or none is in "
            "the optimizer's param_groups); there is nothing to average"
        )
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for _, p in params
    ):
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend(model, optimizer, buffers=buffers)
    return PlainBackend(model, optimizer, buffers=buffers)
