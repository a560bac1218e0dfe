"""Engine backends behind one interface, found through one registry.

Each engine module exposes ``backend_for(model, optimizer, buffers)``: a backend when the model
(or its optimizer) belongs to that engine, else None. :data:`ENGINES` lists them in the order
they are asked, most specific first; a new engine is one module plus one line here.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .base import Backend, Shard, canonical_name
from .plain import PlainBackend, trainable_parameters

__all__ = ["ENGINES", "Backend", "Shard", "canonical_name", "select_backend", "PlainBackend"]

ENGINES = ("deepspeed", "fsdp2", "plain")
"""Modules of ``pma_dist.backends`` asked in turn; ``plain`` takes any model."""


def select_backend(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, buffers: bool = True
) -> Backend:
    """The backend of the first engine in :data:`ENGINES` that claims ``model``. ``buffers``
    averages the persistent floating buffers too (see
    :func:`~pma_dist.backends.base.floating_buffers`)."""
    for engine in ENGINES:
        module = importlib.import_module(f"{__name__}.{engine}")
        backend = module.backend_for(model, optimizer, buffers)
        if backend is not None:
            return backend
    raise AssertionError("the plain backend takes every model")


def require_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list:
    """The trainable parameters, or a clear error when there are none."""
    params = trainable_parameters(model, optimizer)
    if not params:
        raise ValueError(
            "Merger: the model has no trainable parameters (none requires grad, or none is in "
            "the optimizer's param_groups); there is nothing to average"
        )
    return params
