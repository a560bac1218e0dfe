"""The tensor work under the averaging state: fused copies that also judge finiteness, weighted
sums and guarded lerps over groups of tensors, and where slots live (offload).

Three implementations of the one-pass checked copy sit behind :func:`copy_checked`: a small
compiled C++ kernel for CPU tensors (``_cpu``, built on first use from ``csrc/``), a Triton
kernel for large CUDA tensors (``_triton``), and ``torch._foreach_*`` batches for the rest
(``_fused``). The compressed window's delta codes (``_codes``) encode a snapshot as its
difference from a base and merge differences back, compiled on CPU too. :func:`unfused` turns
the compiled and Triton kernels off for a while, so benchmarks and tests can compare them with
torch's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _cpu, _triton
from ._codes import CODE_DTYPES, CODES, decode_elements
from ._codes import decode as decode_deltas
from ._codes import encode as encode_delta
from ._codes import merge as merge_deltas
from ._codes import merge_values as merge_decoded
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
from ._segments import BLOCK, Segment, exps_shape
from ._segments import segments as delta_segments

__all__ = [
    "BLOCK",
    "CODES",
    "CODE_DTYPES",
    "CPU_BLOCK_NUMEL",
    "DEVICE_BATCH_BYTES",
    "STAGING_NUMEL",
    "Runs",
    "Segment",
    "SideStreamCopy",
    "Tensors",
    "all_finite",
    "build_cpu_kernel",
    "chunks",
    "copy_checked",
    "copy_group",
    "decode_deltas",
    "decode_elements",
    "delta_segments",
    "device_groups",
    "empty_slot",
    "encode_delta",
    "exps_shape",
    "fold_group",
    "guarded_lerp",
    "lerp_group",
    "merge_decoded",
    "merge_deltas",
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
