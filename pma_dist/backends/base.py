"""The one interface between the averaging code and a training engine.

A backend answers three questions for the :class:`~pma_dist.Merger`: which tensors does this
rank own in master precision (the *shards*), how do they look in a checkpoint so that DCP can
reshard them, and what must happen around an in-place overwrite of them. Everything else
(schedule, math, swaps) is engine-independent, which is why adding an engine is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
"""Name parts added by DDP, ``torch.compile`` and activation checkpointing; they are dropped so
that state keys match between wrapped and unwrapped runs of the same model."""


def canonical_name(name: str) -> str:
    """A parameter name with wrapper prefixes (``module.``, ``_orig_mod.``, ...) removed."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class Fragment:
    """A contiguous run of one parameter's elements inside a shard.

    ``shard.local.view(-1)[local_start : local_start + numel]`` holds elements
    ``[start, start + numel)`` of the flattened parameter ``param``. Fragments describe any
    layout (whole tensors, FSDP2 row shards, DeepSpeed flat partitions) in one vocabulary, so
    averaging state saved under one layout can be loaded under another.
    """

    param: str
    """Canonical parameter name."""
    shape: tuple[int, ...]
    """Full shape of the parameter."""
    start: int
    """Offset in the flattened parameter."""
    numel: int
    """Number of elements."""
    local_start: int = 0
    """Offset in the flattened shard."""


@dataclass(frozen=True)
class Shard:
    """One tensor this rank owns, in the precision the optimizer updates."""

    name: str
    """Canonical parameter name (or fragment name) that keys the checkpointed state."""
    local: torch.Tensor
    """The live values on this rank: read by snapshots, overwritten by swaps, in place."""
    global_shape: tuple[int, ...]
    """Shape of the whole tensor across ranks (for state validation across world sizes)."""
    checkpoint_view: Callable[[torch.Tensor], torch.Tensor] | None
    """Turns a buffer shaped like ``local`` into the object saved in a DCP checkpoint: the
    buffer itself when every rank holds the whole tensor, or a DTensor sharing its storage,
    laid out like the parameter, so that ``torch.distributed.checkpoint`` reshards it on load.
    ``None`` when the layout has no DCP form (DeepSpeed flat partitions)."""
    fragments: tuple[Fragment, ...] = ()
    """Which parameter elements the shard holds; see :class:`Fragment`."""


@runtime_checkable
class Backend(Protocol):
    """Finds the local master-precision shards of a model and keeps working copies in sync.

    ``shards()`` is called on every snapshot and swap rather than cached, because engines may
    re-point parameters at new storage (FSDP2's lazy init, ``load_state_dict(assign=True)``);
    the order and shapes of the returned shards must stay fixed for the life of a Merger.
    """

    def shards(self) -> list[Shard]:
        """The shards this rank owns, in a fixed order."""
        ...

    def begin_write(self) -> None:
        """Prepare for an in-place overwrite of the shards (e.g. drop unsharded FSDP copies)."""
        ...

    def end_write(self) -> None:
        """Propagate overwritten shards to whatever the forward pass reads (e.g. fp16 copies)."""
        ...
