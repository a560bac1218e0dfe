"""One Triton kernel for GPU snapshots: copy a tensor into its slot and sum what was written, in
one pass over memory, so that the window snapshot's non-finite check costs no second read.

The ``_foreach`` path of :func:`pma_dist.kernels.copy_checked` copies a batch, then reads it
again (from L2 at best) to sum it; here each block of elements is loaded once, stored, and
summed from registers. Used on CUDA devices (NVIDIA, and AMD through ROCm) when Triton is
installed, as it is with PyTorch's CUDA wheels, for tensors of at least :data:`MIN_NUMEL`
elements (smaller ones cost more to launch one by one than to batch). If the kernel fails to
build, a warning says so once and the ``_foreach`` path takes over for the process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence

import torch

log = logging.getLogger("pma_dist")

BLOCK = 4096
"""Elements each program copies and sums."""
MIN_NUMEL = 1 << 18
"""Smallest tensor copied by the kernel (1 MiB of fp32)."""
enabled = True
"""Set False to keep every copy on the ``_foreach`` path (benchmarks compare the two)."""


def suits(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether copying ``src`` into the slot ``dst`` goes through the kernel: same dtype, or a
    wider one (exact); a narrowing copy is left to torch, whose rounding it then keeps."""
    return (
        enabled
        and dst.device.type == "cuda"
        and (dst.dtype == src.dtype or dst.element_size() > src.element_size())
        and dst.numel() >= MIN_NUMEL
        and dst.is_contiguous()
        and src.is_contiguous()
        and _kernel() is not None
    )


def copy_sum(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``dst[i].copy_(src[i])`` for contiguous tensors on one device, and the float32 sum of
    every element written (a 0-dim tensor on that device; no host sync). None when the kernel
    cannot run, with nothing left half done that the caller's own copy would not redo."""
    global enabled
    kernel = _kernel() if dst else None
    if kernel is None:
        return None
    device = dst[0].device
    counts = [-(-t.numel() // BLOCK) for t in dst]
    partials = torch.empty(sum(counts), dtype=torch.float32, device=device)
    start = 0
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for out, live, count in zip(dst, src, counts):
                kernel[(count,)](live, out, partials[start:], out.numel(), BLOCK=BLOCK)
                start += count
    except Exception as err:  # noqa: BLE001 - any build failure falls back to torch's kernels
        enabled = False
        log.warning("PMA's Triton copy kernel failed (%s); using torch's foreach kernels", err)
        return None
    return partials.sum()


@functools.cache
def _kernel():
    """The jitted kernel, or None when Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_and_sum(src, dst, partials, numel, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        written = tl.load(src + offsets, mask=inside, other=0).to(dst.dtype.element_ty)
        tl.store(dst + offsets, written, mask=inside)
        tl.store(partials + program, tl.sum(written.to(tl.float32), axis=0))

    return copy_and_sum
