"""The DCP form of a Merger's averaging state: slots laid out like their parameters, so that
``torch.distributed.checkpoint`` saves them sharded and reshards them on load; buffers as
replicated tensors. Checked in full before anything changes; it carries the same
:class:`~pma_dist.state.StateHeader` as the per-rank files (``_rank_files``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..backends import Backend
from ..core import AveragingState
from ..errors import PMAStateError
from ._format import StateHeader


def dcp_state(backend: Backend, state: AveragingState, header: StateHeader) -> dict[str, Any]:
    """The state dict DCP saves: the header's flat form and ``slots.<k>.<name>`` tensors."""
    state.wait_host()
    shards = backend.shards()
    if any(s.checkpoint_view is None for s in shards):
        raise TypeError(
            f"{type(backend).__name__} shards have no DCP form; save the averaging state with "
            "Merger.save(directory) (or the engine's save_checkpoint)"
        )
    slots = {
        str(k): {s.name: s.checkpoint_view(buf) for s, buf in zip(shards, slot)}
        for k, slot in enumerate(state.slots)
    }
    return {**header.to_flat(), "slots": slots}


def load_dcp_state(
    saved: Mapping[str, Any], state: AveragingState, ours: StateHeader
) -> StateHeader:
    """Copy the slots of a loaded DCP state dict into ``state``; the saved header.

    Everything is checked before a slot changes. Format 1 saved no buffers: their slots are
    left for :func:`buffers_from_live`.
    """
    missing = [k for k in ("meta", "count", "slots", "schedule") if k not in saved]
    if missing:
        raise PMAStateError(f"PMA state lacks {missing}: not a Merger.state_dict()")
    header = StateHeader.from_flat(saved, "Merger.load_state_dict")
    header.check_matches(ours, "Merger.load_state_dict")
    names = [n for n in ours.names if header.format > 1 or n not in ours.buffers]
    try:
        sources = [
            [_local(saved["slots"][str(k)][name]) for name in names]
            for k in range(len(state.slots))
        ]
    except KeyError as missing_key:
        raise PMAStateError(f"PMA state is incomplete: no slot entry {missing_key}") from None
    index = {name: i for i, name in enumerate(ours.names)}
    targets = [[slot[index[n]] for n in names] for slot in state.slots]
    for k, (slot, srcs) in enumerate(zip(targets, sources)):
        for name, dst, src in zip(names, slot, srcs):
            if tuple(src.shape) != tuple(dst.shape):
                raise PMAStateError(
                    f"PMA state slot {k}, {name!r}: local shape {tuple(src.shape)}, this rank "
                    f"expects {tuple(dst.shape)}"
                )
    state.wait_host()
    with torch.no_grad():
        for slot, srcs in zip(targets, sources):
            for dst, src in zip(slot, srcs):
                if src.data_ptr() != dst.data_ptr() or src.numel() == 0:
                    dst.copy_(src)
    return header


def buffers_from_live(backend: Backend, state: AveragingState) -> None:
    """Fill the buffers of every filled slot with the live buffers, for a state saved without
    them (format 1), and say so."""
    buffers = [(i, s) for i, s in enumerate(backend.shards()) if s.buffer]
    if not buffers:
        return
    warnings.warn(
        f"PMA state format 1 holds no buffers: {', '.join(s.name for _, s in buffers[:5])} "
        "start from their live values in every snapshot of the window",
        stacklevel=4,
    )
    with torch.no_grad():
        for slot, record in zip(state.slots, state.records):
            if record is not None:
                for i, shard in buffers:
                    slot[i].copy_(shard.local)


def _local(tensor: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.to_local()
    if not isinstance(tensor, torch.Tensor):
        raise PMAStateError(f"PMA state slot holds {type(tensor).__name__}, expected a tensor")
    return tensor
