"""Writing a merge into the live tensors, for good (``apply``) or for a while (``swapped``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from ..backends import Backend
from ..core import AveragingState
from ..kernels import empty_slot, slot_device


def write(backend: Backend, fill: Callable[[], None]) -> None:
    """Overwrite the shards in place between the backend's write brackets."""
    backend.begin_write()
    with torch.no_grad():
        fill()
    backend.end_write()


def apply_merge(backend: Backend, state: AveragingState, weights: Sequence[float]) -> None:
    """Make the merge the live values (parameters and averaged buffers)."""
    shards = [s.local for s in backend.shards()]
    state.wait_device()
    write(backend, lambda: state.merge_into(shards, weights))


@contextmanager
def swapped_in(
    backend: Backend, state: AveragingState, weights: Sequence[float], offload: str
) -> Iterator[None]:
    """The merge as the live values for the body; the originals back bitwise after it, also
    when it raises. The backup lives where the slots do."""
    shards = [s.local for s in backend.shards()]
    state.wait_device()
    backup = [empty_slot(t, t.dtype, slot_device(t.device, offload)) for t in shards]
    for dst, src in zip(backup, shards):
        dst.copy_(src)
    try:
        write(backend, lambda: state.merge_into(shards, weights))
        yield
    finally:
        write(backend, lambda: [d.copy_(s) for d, s in zip(shards, backup)])
