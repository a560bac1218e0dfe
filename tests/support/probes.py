"""Probes on a Merger's behaviour: judged snapshots, and counts of the collectives and host
syncs a block of code makes (by wrapping the real ``torch.distributed`` and ``Tensor``
functions, which keep working)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from pma_dist import Merger
from pma_dist.kernels import _fused as kernels

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather", "gather_object",
    "scatter", "all_to_all", "all_to_all_single", "barrier", "reduce", "send", "recv",
)  # fmt: skip
HOST_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


def judged_snapshot(merger: Merger) -> bool:
    """Take a snapshot and have the ranks agree on it at once: True when it was accepted."""
    skipped = merger.num_skipped
    taken = merger.snapshot()
    merger.agree()
    return taken and merger.num_skipped == skipped


@contextmanager
def counted_calls(*extra: tuple[object, str], sizes: bool = False) -> Iterator[Counter]:
    """Count calls of every ``torch.distributed`` collective and every ``Tensor`` method that
    waits for a device's result (and of the ``(owner, name)`` functions in ``extra``), made
    inside the block. With ``sizes``, ``"<collective> numel"`` is also the most elements one
    call of it moved."""
    calls: Counter = Counter()
    originals = []

    def counting(owner, name: str):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            if sizes and owner is dist:
                flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
                numels = [t.numel() for t in flat if isinstance(t, torch.Tensor)]
                calls[f"{name} numel"] = max([calls[f"{name} numel"], *numels])
            return original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in COLLECTIVES:
        counting(dist, name)
    for name in HOST_SYNCS:
        counting(torch.Tensor, name)
    for owner, name in extra:
        counting(owner, name)
    try:
        yield calls
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


@contextmanager
def accelerator_fold() -> Iterator[None]:
    """Inside the block, running-mode folds of CPU tensors take the accelerator's path (the
    agreed verdict guards the lerp on the device and the host never reads it) instead of the
    CPU's (where reading the verdict costs nothing)."""
    original = kernels.folds_on_host
    kernels.folds_on_host = lambda dst, src: False
    try:
        yield
    finally:
        kernels.folds_on_host = original


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Every CUDA call that synchronizes the host raises inside the body
    (``torch.cuda.set_sync_debug_mode("error")``), so a hidden sync fails a test."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
