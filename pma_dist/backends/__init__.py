"""Engine backends behind one interface, found through one registry.

Each engine module exposes ``backend_for(model, optimizer, buffers)``: a backend when the model
(or its optimizer) belongs to that engine, else None. :data:`ENGINES` lists them in the order
they are asked, most specific first; a new engine is one module plus one line here. Only its
backend knows an engine: the rest of pma_dist sees :class:`Backend`, :class:`Shard` and
:class:`Fragment` (``_base``) and, for export, a :class:`TensorSource` (``_sources``).

Modules: ``_base`` (the interface and its vocabulary), ``_params`` (what every backend needs of
a module), ``_plain``, ``_fsdp2``, ``_deepspeed`` (+ ``_deepspeed_names``; ``_deepspeed_probe``
tells DeepSpeed objects apart without importing it), ``_megatron`` (+ ``_megatron_probe``, the
same for Megatron-Core; ``_megatron_names``, its map to Llama's tensors), ``_releases``
(the tested-release rule), ``_sources``, ``_delivery`` and ``_master_source`` (full tensors
for export),
``_optimizers`` (unwrapping optimizer wrappers). Importing this face imports no engine, nor
DTensor: the engine modules load when :func:`select_backend` asks them.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ._base import Backend, Fragment, Shard, canonical_name, floating_buffers
from ._deepspeed_probe import check_version as check_deepspeed_version
from ._deepspeed_probe import is_deepspeed_engine, zero_optimizer_of
from ._megatron_probe import is_megatron_optimizer
from ._optimizers import optimizer_chain, unwrap_optimizer
from ._params import require_parameters, trainable_parameters
from ._plain import PlainBackend
from ._sources import ModuleSource, TensorSource, meta_state, module_state

__all__ = [
    "ENGINES",
    "Backend",
    "Fragment",
    "ModuleSource",
    "PlainBackend",
    "Shard",
    "TensorSource",
    "canonical_name",
    "check_deepspeed_version",
    "floating_buffers",
    "is_deepspeed_engine",
    "is_megatron_optimizer",
    "meta_state",
    "module_state",
    "optimizer_chain",
    "require_parameters",
    "select_backend",
    "trainable_parameters",
    "unwrap_optimizer",
    "zero_optimizer_of",
]

ENGINES = ("megatron", "deepspeed", "fsdp2", "plain")
"""Engines asked in turn (the modules ``pma_dist.backends._<engine>``); ``plain`` takes any
model. Megatron comes first: its ``ChainedOptimizer`` raises on ``.optimizer`` when it chains
several, and its mains sit in ``param_groups`` where the others would take them for
parameters."""


def select_backend(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, buffers: bool = True
) -> Backend:
    """The backend of the first engine in :data:`ENGINES` that claims ``model``. ``buffers``
    averages the persistent floating buffers too (see :func:`floating_buffers`)."""
    for engine in ENGINES:
        module = importlib.import_module(f"{__name__}._{engine}")
        backend = module.backend_for(model, optimizer, buffers)
        if backend is not None:
            return backend
    raise AssertionError("the plain backend takes every model")
