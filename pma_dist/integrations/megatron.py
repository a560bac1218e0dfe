"""PMA in a Megatron-Core training loop: ``merger = attach(model, optimizer, config)`` right
after ``get_megatron_optimizer``.

The Merger averages the distributed optimizer's fp32 main shards, each data-parallel rank its
own (``pma_dist.backends`` picks the Megatron backend for it), and is stepped once per
successful ``optimizer.step()``: a step Megatron skips (``update_successful`` false, e.g. a
gradient overflow under fp16) takes no snapshot. Each step counts ``tokens_per_step`` global
tokens, or what ``merger.add_tokens`` counted since the last step, or the config's
``tokens_per_step``. ``attach`` wraps that one method of the optimizer object (an attribute of
the instance, over its class's method); :func:`detach` deletes it again and closes the Merger.

Swaps (``merger.swapped()``), ``apply`` and merges work as everywhere; a swap writes the merge
into the mains and all-gathers the model parameters as Megatron's step does, and puts the
originals back bitwise. Per-rank ``merger.save``/``load`` reshard to any data-parallel size.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..backends import is_megatron_optimizer
from ..config import PMAConfig
from ..merger import Merger

_ATTACHED: weakref.WeakKeyDictionary[Merger, Any] = weakref.WeakKeyDictionary()
"""The optimizer each attached Merger's step rides on."""


def attach(
    model: nn.Module | Sequence[nn.Module],
    optimizer: Any,
    config: PMAConfig | Mapping[str, Any] | None = None,
    *,
    tokens_per_step: int | None = None,
) -> Merger:
    """A Merger over ``model`` (the model chunks Megatron's ``get_model`` returns, or the one
    DDP-wrapped module) trained by ``optimizer`` (what ``get_megatron_optimizer`` returned),
    stepped by every successful ``optimizer.step()`` with ``tokens_per_step`` global tokens."""
    config = PMAConfig.coerce(config, owner="pma_dist.integrations.megatron.attach")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(chunks) != 1:
        raise ValueError(
            f"attach: {len(chunks)} model chunks given; pma_dist averages one chunk per rank "
            "(virtual pipeline parallelism is not supported)"
        )
    if not is_megatron_optimizer(optimizer):
        raise TypeError(
            f"attach: optimizer is a {type(optimizer).__name__}; pass what Megatron-Core's "
            "get_megatron_optimizer returned (for other optimizers, use pma_dist.Merger)"
        )
    if "step" in vars(optimizer):
        raise RuntimeError("attach: this optimizer's step is already wrapped (detach first)")
    merger = Merger(chunks[0], optimizer, config)
    step = optimizer.step

    def step_and_snapshot(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        if _succeeded(result):
            merger.step(tokens_per_step)
        return result

    optimizer.step = step_and_snapshot
    _ATTACHED[merger] = optimizer
    return merger


def detach(merger: Merger) -> None:
    """Unwrap the optimizer's step and remove every hook of ``merger`` (its state stays
    readable)."""
    optimizer = _ATTACHED.pop(merger, None)
    if optimizer is not None and "step" in vars(optimizer):
        del optimizer.step
    merger.close()


def _succeeded(result: Any) -> bool:
    """Whether ``optimizer.step()`` updated the parameters: Megatron returns
    ``(update_successful, grad_norm, num_zeros_in_grad)``."""
    return bool(result[0] if isinstance(result, tuple) else result)
