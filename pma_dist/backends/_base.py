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
from torch import nn

WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
"""Path components that ``torch.compile``, activation checkpointing and FSDP1 insert anywhere in
a module tree; they name no module of the model, so they are dropped wherever they stand."""

ROOT_WRAPPER_COMPONENTS = WRAPPER_COMPONENTS | {"module"}
"""Also dropped at the start of a name: ``module`` is what DDP (and DeepSpeed, Accelerate)
call the model they wrap. Inside a name it can be a user's own submodule, so it stays there."""


def canonical_name(name: str) -> str:
    """``name`` as the unwrapped model's ``state_dict`` calls it.

    Wrapper components are removed as whole dotted components, in any nesting (compile over
    DDP over activation checkpointing), so that the same model has the same names wrapped or
    not, and a module called ``conv_module`` keeps its name.
    """
    parts = name.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in ROOT_WRAPPER_COMPONENTS:
        start += 1
    return ".".join(p for p in parts[start:] if p not in WRAPPER_COMPONENTS)


def floating_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(canonical name, buffer)`` for every persistent floating-point buffer of ``model``.

    Those are what a checkpoint holds beside the parameters and what training may move outside
    the optimizer (the expert bias of auxiliary-loss-free MoE balancing, running statistics),
    so the average of checkpoints averages them. Integer buffers (counters) and non-persistent
    ones (caches, rotary tables) are not in a checkpoint's average and are left alone.
    """
    out, seen = [], set()
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is None or not buffer.is_floating_point() or id(buffer) in seen:
                continue
            if name in module._non_persistent_buffers_set:
                continue
            seen.add(id(buffer))
            full = f"{module_name}.{name}" if module_name else name
            out.append((canonical_name(full), buffer))
    return out


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
    buffer: bool = False
    """True for a module buffer (a whole replica on every rank, written in place)."""
    rows_split: bool = False
    """True when the layout splits the tensor's last dimension across ranks (a ``Shard`` of it
    over more than one rank), the same on every rank: a per-row block (an fp8 scale) then has
    no checkpoint layout like the parameter's, so each element carries its own."""

    @property
    def runs(self) -> tuple[tuple[int, int], ...] | None:
        """``(local_start, numel)`` runs of ``local`` that hold real elements, merged where they
        touch, or None when the fragments cover ``local`` whole.

        Anything else in ``local`` is padding that the engine may never initialize (DeepSpeed
        ZeRO-3 pads every parameter's partition): snapshots copy and checks read these runs
        only, so padding never reaches an average or a decision.
        """
        spans = sorted((f.local_start, f.numel) for f in self.fragments if f.numel)
        runs: list[list[int]] = []
        for start, numel in spans:
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += numel
            else:
                runs.append([start, numel])
        if len(runs) == 1 and runs[0] == [0, self.local.numel()] or self.local.numel() == 0:
            return None
        return tuple((start, numel) for start, numel in runs)


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

    # Optional: ``source()`` returns a :class:`~pma_dist.backends.TensorSource` for
    # export (full tensors as the engine holds them in master precision); without it, export
    # reads the model's state dict. ``step_optimizers()`` returns the torch optimizers whose
    # ``step`` writes the shards (where the one under the optimizer's wrappers is not it).
    # ``hf_convert()`` maps a full tensor of ``source()`` to a Hugging Face architecture's
    # tensors (Megatron-Core's fused projections to Llama's).
