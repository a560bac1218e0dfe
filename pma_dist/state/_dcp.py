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
    """The state dict DCP saves: the header's flat form and the stored planes, each tensor laid
    out like its parameter (``slots.<k>.<name>``; compressed: ``base``, ``deltas.<k>``,
    ``scales.<k>``)."""
    state.wait_host()
    shards = backend.shards()
    if any(s.checkpoint_view is None for s in shards):
        raise TypeError(
            f"{type(backend).__name__} shards have no DCP form; save the averaging state with "
            "Merger.save(directory) (or the engine's save_checkpoint)"
        )
    out = header.to_flat()
    for key, plane in state.stored():
        entry = {s.name: s.checkpoint_view(t) for s, t in zip(shards, plane)}
        _nest(out, key, entry)
    return out


def load_dcp_state(
    saved: Mapping[str, Any], state: AveragingState, ours: StateHeader
) -> StateHeader:
    """Copy the stored planes of a loaded DCP state dict into ``state``; the saved header.

    Everything is checked before a plane changes. Format 1 saved no buffers: their slots are
    left for :func:`buffers_from_live`.
    """
    missing = [k for k in ("meta", "count", "schedule") if k not in saved]
    if missing:
        raise PMAStateError(f"PMA state lacks {missing}: not a Merger.state_dict()")
    header = StateHeader.from_flat(saved, "Merger.load_state_dict")
    header.check_matches(ours, "Merger.load_state_dict")
    if header.compression != ours.compression:
        raise PMAStateError(
            f"Merger.load_state_dict: PMA state was saved with pma.compression = "
            f"{header.compression!r}, this Merger keeps {ours.compression!r}; a DCP checkpoint "
            "loads into the same kind (per-rank files, Merger.save/load, convert between them)"
        )
    names = [n for n in ours.names if header.format > 1 or n not in ours.buffers]
    index = {name: i for i, name in enumerate(ours.names)}
    pairs = []
    for key, plane in state.stored():
        try:
            entry = _lookup(saved, key)
            sources = [_local(entry[name]) for name in names]
        except KeyError as missing_key:
            raise PMAStateError(f"PMA state is incomplete: no entry {missing_key}") from None
        for name, src in zip(names, sources):
            dst = plane[index[name]]
            if tuple(src.shape) != tuple(dst.shape):
                raise PMAStateError(
                    f"PMA state {key}, {name!r}: local shape {tuple(src.shape)}, this rank "
                    f"expects {tuple(dst.shape)}"
                )
            pairs.append((dst, src))
    state.wait_host()
    with torch.no_grad():
        for dst, src in pairs:
            if src.data_ptr() != dst.data_ptr() or src.numel() == 0:
                dst.copy_(src)
    return header


def _nest(out: dict[str, Any], key: str, value: Any) -> None:
    """``out[a][b] = value`` for ``key = "a.b"``."""
    *parents, leaf = key.split(".")
    for part in parents:
        out = out.setdefault(part, {})
    out[leaf] = value


def _lookup(saved: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    for part in key.split("."):
        saved = saved[part]
    return saved


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
