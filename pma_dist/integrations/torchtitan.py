"""PMA in torchtitan: a step post-hook on the ``OptimizersContainer`` and a checkpoint entry.

torchtitan builds the optimizers, then calls the model spec's ``post_optimizer_build_fn``
(``optimizers, model_parts, parallel_dims``), then builds the ``CheckpointManager`` and loads it
at the start of ``Trainer.train()``. So:

* :func:`post_optimizer_build_fn` returns that function: it runs the spec's own one first
  (``register_moe_load_balancing_hook`` for MoE models), then :func:`attach`, so the Merger's
  post-hook is registered after every hook that one installed and a snapshot holds the expert
  biases as updated at that step (torch runs step hooks in registration order, pre-hooks
  before the step and post-hooks after it).
* :func:`attach` builds a :class:`~pma_dist.Merger` over the model part and the container
  (FSDP2 shards, or whole tensors) and steps it once per ``optimizers.step()``: torchtitan calls
  it once per global batch, after gradient accumulation. Its tokens are the step's *global*
  tokens: ``tokens`` (a number, or a callable asked at each step), else ``pma.tokens_per_step``.
* :func:`join` (or :func:`checkpoint_states`) puts the Merger in the checkpoint's ``states``
  as ``"pma"``: it is a DCP ``Stateful`` whose slots are DTensors laid out like the parameters,
  so a checkpoint written at one world size loads at another.
* :func:`detach` removes the hook and closes the Merger.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..config import PMAConfig
from ..core import lacks_token_source
from ..merger import Merger

STATE_KEY = "pma"
"""The key of the Merger in the ``CheckpointManager``'s states (and in its DCP checkpoints)."""

Tokens = int | Callable[[], int] | None
"""The global tokens of one optimizer step: a number, a callable asked after each step, or None
(``pma.tokens_per_step``, or what :meth:`~pma_dist.Merger.add_tokens` counted)."""

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``(merger, hook handle)`` by the ``OptimizersContainer`` they were attached to."""


def post_optimizer_build_fn(
    config: PMAConfig | Mapping[str, Any],
    *,
    inner: Callable[..., None] | None = None,
    tokens: Tokens = None,
) -> Callable[..., None]:
    """The function for ``ModelSpec.post_optimizer_build_fn``: ``inner`` (the spec's own, e.g.
    ``register_moe_load_balancing_hook``) and then :func:`attach`. A bad config is refused here,
    before torchtitan builds anything."""
    config = PMAConfig.coerce(config, owner="post_optimizer_build_fn")
    _check_tokens(config, tokens)

    def build(optimizers, model_parts: list[nn.Module], parallel_dims: Any = None) -> None:
        if inner is not None:
            inner(optimizers, model_parts, parallel_dims)
        if config.enabled:
            attach(optimizers, model_parts, config, tokens=tokens, parallel_dims=parallel_dims)

    return build


def attach(
    optimizers,
    model_parts: list[nn.Module],
    config: PMAConfig | Mapping[str, Any],
    *,
    tokens: Tokens = None,
    parallel_dims: Any = None,
) -> Merger:
    """Build a Merger over ``model_parts`` and step it after every ``optimizers.step()``, after
    the step hooks already registered; :func:`detach` undoes it. One Merger per container."""
    if optimizers in _ATTACHED:
        raise RuntimeError("this OptimizersContainer already has a PMA Merger (merger_of)")
    if len(model_parts) != 1 or getattr(parallel_dims, "pp_enabled", False):
        raise ValueError(
            f"pma_dist torchtitan: {len(model_parts)} model parts (pipeline parallelism) are not "
            "supported; PMA needs the whole model, one part per rank"
        )
    config = PMAConfig.coerce(config, owner="attach")
    _check_tokens(config, tokens)
    merger = Merger(model_parts[0], optimizers, config)

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        merger.step(tokens() if callable(tokens) else tokens)

    _ATTACHED[optimizers] = (merger, optimizers.register_step_post_hook(after_step))
    return merger


def merger_of(optimizers) -> Merger | None:
    """The Merger :func:`attach` gave ``optimizers``, if any."""
    entry = _ATTACHED.get(optimizers)
    return entry[0] if entry is not None else None


def detach(optimizers) -> Merger | None:
    """Remove the step hook and close the Merger (its state stays readable); the Merger, or None
    if none was attached."""
    entry = _ATTACHED.pop(optimizers, None)
    if entry is None:
        return None
    merger, handle = entry
    handle.remove()
    merger.close()
    return merger


def checkpoint_states(merger: Merger | None) -> dict[str, Any]:
    """The entry of ``CheckpointManager(states=...)`` for ``merger``: ``{"pma": merger}``, or
    nothing when PMA is off, so a config without PMA loads checkpoints as before."""
    return {STATE_KEY: merger} if merger is not None else {}


def join(checkpointer, optimizers) -> Merger | None:
    """Add the Merger of ``optimizers`` to a built ``CheckpointManager``'s states: for a
    ``Trainer`` whose checkpointer was built in ``__init__``, call it before ``train()``, which
    loads the checkpoint. A disabled checkpointer (no ``states``) is left alone."""
    merger = merger_of(optimizers)
    states = getattr(checkpointer, "states", None)
    if states is not None:
        states.update(checkpoint_states(merger))
    return merger


def _check_tokens(config: PMAConfig, tokens: Tokens) -> None:
    """A token schedule needs the global tokens of each step; refuse it without them instead of
    counting local batches."""
    counted = isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0
    if not (tokens is None or callable(tokens) or counted):
        raise ValueError(f"pma_dist torchtitan: tokens={tokens!r}: a count or a callable")
    if lacks_token_source(config, tokens is not None):
        raise ValueError(
            "pma_dist torchtitan: the PMA schedule counts tokens (interval_tokens/start_tokens) "
            "but no global token count is given: set pma.tokens_per_step (global batch size x "
            "sequence length) or pass tokens= (a callable returning the step's global tokens)"
        )
