"""The tensor work under the averaging state: fused copies that also judge finiteness, weighted
sums and guarded lerps over groups of tensors, and where slots live (offload).

Three implementations of the one-pass checked copy sit behind :func:`copy_checked`: a small
compiled C++ kernel for CPU tensors (``_cpu``, built on first use from ``csrc/``), a Triton
kernel for large CUDA tensors (``_triton``), and ``torch._foreach_*`` batches for the rest
(``_fused``). :func:`unfused` turns the first two off for a while, so benchmarks and tests can
compare them with torch's own kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _cpu, _triton
from ._fused import (
    CPU_BLOCK_NUMEL,
    DEVICE_BATCH_BYTES,
    Runs,
    Tensors,
    all_finite,
    copy_checked,
    copy_group,
    device_groups,
    fold_group,
    guarded_lerp,
    lerp_group,
    real_views,
    weighted_sum,
)
from ._offload import STAGING_NUMEL, SideStreamCopy, chunks, empty_slot, slot_device

__all__ = [
    "CPU_BLOCK_NUMEL",
    "DEVICE_BATCH_BYTES",
    "STAGING_NUMEL",
    "Runs",
    "SideStreamCopy",
    "Tensors",
    "all_finite",
    "build_cpu_kernel",
    "chunks",
    "copy_checked",
    "copy_group",
    "device_groups",
    "empty_slot",
    "fold_group",
    "guarded_lerp",
    "lerp_group",
    "real_views",
    "slot_device",
    "unfused",
    "weighted_sum",
]


def build_cpu_kernel() -> str | None:
    """Build (or find) the CPU copy kernel now; the path of its library, or None when it
    cannot be built here (CPU snapshots then check block by block)."""
    return _cpu.built()


@contextmanager
def unfused() -> Iterator[None]:
    """Checked copies on torch's kernels alone (copy, then sum) for the body: the compiled CPU
    kernel and the Triton kernel are off, and back on after it, also when it raises."""
    before = _cpu.enabled, _triton.enabled
    _cpu.enabled = _triton.enabled = False
    try:
        yield
    finally:
        _cpu.enabled, _triton.enabled = before
