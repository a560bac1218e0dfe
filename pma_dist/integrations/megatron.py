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
:func:`export_checkpoint` writes the merge as a Megatron ``torch_dist`` checkpoint.

The average rides with Megatron's checkpoints: :func:`save_checkpoint` writes it inside the
iteration's checkpoint directory under a name that holds the iteration, and
:func:`check_checkpoint` / :func:`load_checkpoint` read it back at any parallel layout, checked
before Megatron loads anything; a checkpoint without it starts a fresh average with a warning.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..backends import is_megatron_optimizer
from ..config import PMAConfig
from ..export import commit_collectively
from ..merger import Merger
from ..state import has_files

log = logging.getLogger("pma_dist")

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


def export_checkpoint(
    merger: Merger, path: str | Path, method: Any = None, *, weights: Any = None,
    last: int | None = None, stride: int | None = None,
) -> Path:  # fmt: skip
    """Write the merge (as :meth:`~pma_dist.Merger.swapped` takes it) to ``path`` as a
    Megatron ``torch_dist`` checkpoint of the model: ``dist_checkpointing.save`` of the
    unwrapped model's ``sharded_state_dict()`` with the merge swapped in, so
    ``dist_checkpointing.load`` reads it into a fresh model at any parallel layout, and
    Megatron's converters take it from there. The weights are the model's (bf16 models: the
    merge rounded to bf16, as Megatron's model checkpoints hold them). Atomic: ``path`` is
    replaced only once the whole checkpoint is written (with a manifest). Collective."""
    from megatron.core import dist_checkpointing

    optimizer = _ATTACHED.get(merger)
    if optimizer is None:
        raise ValueError("export_checkpoint: this Merger was not made by attach (or is detached)")
    merge = {"weights": weights, "last": last, "stride": stride}
    info = {"kind": "megatron torch_dist", "pma": merger.describe_merge(method, **merge)}
    with merger.swapped(method, **merge):
        state = _unwrapped(merger._model).sharded_state_dict()

        def write(directory: Path) -> dict:
            dist_checkpointing.save(state, str(directory))
            return {}

        return commit_collectively(Path(path), write, None, info, merger.process_group)


def checkpoint_directory(checkpoint_dir: str | Path, iteration: int) -> Path:
    """Where :func:`save_checkpoint` keeps iteration ``iteration``'s averaging state inside
    Megatron's checkpoint directory of that iteration: a name that holds the iteration, so
    a resume never reads another iteration's average."""
    return Path(checkpoint_dir) / f"pma_iter_{int(iteration):07d}"


def save_checkpoint(merger: Merger, checkpoint_dir: str | Path, iteration: int) -> Path:
    """Save the averaging state with Megatron's checkpoint of ``iteration`` in
    ``checkpoint_dir`` (Megatron-LM's ``iter_0000100`` directory, or wherever
    ``dist_checkpointing.save`` wrote it): one file per rank and an index, which reshard to
    any data- and tensor-parallel size. Call it after Megatron's save and before the tracker
    (``latest_checkpointed_iteration.txt``) names the iteration. Collective."""
    return merger.save(checkpoint_directory(checkpoint_dir, iteration))


def check_checkpoint(merger: Merger, checkpoint_dir: str | Path, iteration: int) -> bool:
    """Whether Megatron's checkpoint of ``iteration`` holds an average for ``merger``; raises
    ``PMAStateError`` if the one it holds is corrupted or does not fit this run. Changes
    nothing: call it before Megatron loads anything, so a bad average stops the resume there
    (a :func:`load_checkpoint` that follows reads the state once)."""
    directory = checkpoint_directory(checkpoint_dir, iteration)
    if not has_files(directory):
        return False
    merger.check_saved(directory)
    return True


def load_checkpoint(
    merger: Merger, checkpoint_dir: str | Path, iteration: int, *, fresh: bool = False
) -> bool:
    """Resume the average saved with Megatron's checkpoint of ``iteration``; True when one was
    loaded. With ``fresh`` (Megatron-LM's ``--finetune`` or ``--no-load-optim``: the
    optimizer starts over), and where the checkpoint holds none (written without PMA, or a
    crash came between Megatron's save and PMA's), the average starts afresh, with a warning.
    Checked in full before anything changes (see :func:`check_checkpoint`). Collective."""
    where = checkpoint_directory(checkpoint_dir, iteration)
    if fresh or not check_checkpoint(merger, checkpoint_dir, iteration):
        why = "fresh=True (a fine-tune, or no optimizer state loaded)" if fresh else (
            f"{where} holds no averaging state")  # fmt: skip
        log.warning("pma_dist: a fresh average from iteration %d: %s", iteration, why)
        return False
    merger.load(where)
    return True


def _unwrapped(chunk: nn.Module) -> nn.Module:
    """The model under Megatron's DDP and half-precision wrappers (a ``GPTModel``), whose
    checkpoint keys a fresh model of the architecture has."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def _succeeded(result: Any) -> bool:
    """Whether ``optimizer.step()`` updated the parameters: Megatron returns
    ``(update_successful, grad_norm, num_zeros_in_grad)``."""
    return bool(result[0] if isinstance(result, tuple) else result)
