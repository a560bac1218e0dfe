"""Triton kernels for the compressed window's two passes on a GPU: encode a snapshot against the
base (difference, code, error feedback and the finiteness verdict in one read of each input),
and merge the base and every difference a merge needs in one pass, with no host sync.

They compute what ``_codes`` says, with the bits of the compiled CPU kernel
(``csrc/delta_codes.cpp``) and of the torch expressions: every rounding is spelled out in
integer operations on the float's bits (bfloat16 and e4m3 to nearest even, the block's
power-of-two scale, the e4m3 decode), and the kernels are compiled without contracting a
multiply and an add into one fused rounding. So a window encoded on a GPU holds the same planes
as one encoded on the host, and a checkpoint moves between them bit for bit.

One launch per segment of a tensor, whatever its size: the torch expressions launch some twenty
kernels per piece, and a parameter of a few thousand elements costs the launch alone. The
verdict is a flag the programs raise with an atomic, left on the device. A merge reads the
differences through a table of their addresses (built in pinned memory and copied without a
sync), so any number of planes is one kernel. If a kernel fails to build, a warning says so
once and the torch expressions take over for the process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence

import torch

from ._segments import Segment, exps_of

log = logging.getLogger("pma_dist")

TILE = 4096
"""Elements a program encodes or merges (whole fp8 blocks)."""
enabled = True
"""Set False to keep the compressed window's device passes on the torch expressions."""
_LIVE = (torch.float32, torch.bfloat16)
OUT_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes a merge writes directly (rounded from float32 to nearest even, as ``copy_`` does)."""


def suits_code(code: str, base: torch.Tensor, live: torch.Tensor | None = None) -> bool:
    """Whether the passes over ``base`` (and ``live``) go through the kernels: contiguous CUDA
    tensors on one device, a float32 base, a float32 or bfloat16 live tensor."""
    return (
        enabled
        and base.device.type == "cuda"
        and base.dtype == torch.float32
        and base.is_contiguous()
        and (
            live is None
            or live.device == base.device
            and live.dtype in _LIVE
            and live.is_contiguous()
            and live.numel() == base.numel()
        )
        and _kernels() is not None
    )


def encode(
    code: str,
    base: torch.Tensor,
    live: torch.Tensor,
    delta: torch.Tensor,
    exps: torch.Tensor | None,
    segs: Sequence[Segment],
) -> torch.Tensor | None:
    """The encode pass of ``_codes.encode`` over flat contiguous tensors: a 0-dim float flag on
    their device (1.0 when every element was stored), or None when the kernel cannot run and
    nothing was written."""
    kernels = _kernels()
    bad = torch.zeros(1, dtype=torch.int32, device=base.device)

    def launch(seg: Segment, lo: int, hi: int) -> None:
        args = (base[lo:hi], live[lo:hi], delta[lo:hi])
        if code == "bf16":
            kernels.encode_bf16[_grid(seg, 1)](*args, bad, seg.numel, TILE=TILE, **_EXACT)
            return
        per = TILE // seg.block
        kernels.encode_fp8[_grid(seg, per)](
            *args, exps_of(exps, seg), bad, seg.row, seg.blocks, BLOCKS=per, BLOCK=seg.block,
            **_EXACT,
        )  # fmt: skip

    return (bad == 0).float().reshape(()) if _each_segment(segs, base.device, launch) else None


def merge(
    code: str,
    out: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    planes: Sequence[tuple[torch.Tensor, torch.Tensor | None, float]],
    segs: Sequence[Segment],
) -> bool:
    """The merge pass of ``_codes.merge`` into a flat contiguous ``out`` of a dtype in
    :data:`OUT_DTYPES` on the base's device (``out`` may be ``base``); False when the kernel
    cannot run and nothing was written."""
    kernels = _kernels()
    device = base.device
    coeffs = _table([float(torch.tensor(c, dtype=torch.float32)) for _, _, c in planes], device)
    total = torch.full((1,), float(weight), dtype=torch.float64, device=device)

    def launch(seg: Segment, lo: int, hi: int) -> None:
        deltas = _table([d[lo:hi].data_ptr() for d, _, _ in planes], device)
        ends = (out[lo:hi], base[lo:hi], total)
        if code == "bf16":
            kernels.merge_bf16[_grid(seg, 1)](
                *ends, deltas, coeffs, len(planes), seg.numel, TILE=TILE, **_EXACT
            )
            return
        scales = _table([exps_of(e, seg).data_ptr() for _, e, _ in planes], device)
        per = TILE // seg.block
        kernels.merge_fp8[_grid(seg, per)](
            *ends, deltas, scales, coeffs, len(planes), seg.row, seg.blocks, BLOCKS=per,
            BLOCK=seg.block, **_EXACT,
        )  # fmt: skip

    return _each_segment(segs, device, launch)


_EXACT = {"enable_fp_fusion": False}
"""Launch options: each multiply and add rounded on its own, as on the host."""


def _grid(seg: Segment, blocks_per_program: int) -> tuple[int]:
    """Programs for ``seg``: elements by :data:`TILE` (bf16), or whole fp8 blocks."""
    if blocks_per_program == 1:
        return (-(-seg.numel // TILE),)
    return (-(-seg.blocks // blocks_per_program),)


def _each_segment(segs: Sequence[Segment], device: torch.device, launch) -> bool:
    """``launch(seg, lo, hi)`` for each segment on ``device``; False when the first launch
    fails to build (the kernels are then off, with a warning, and nothing was written)."""
    for done, seg in enumerate(segs):
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                launch(seg, seg.start, seg.start + seg.numel)
        except Exception as err:  # noqa: BLE001 - a build failure falls back to torch's kernels
            if done:
                raise
            _disable(err)
            return False
    return True


def _table(values: list, device: torch.device) -> torch.Tensor:
    """``values`` (addresses as int64, or float32 coefficients) on ``device``, copied from
    pinned memory without a host sync."""
    dtype = torch.int64 if values and isinstance(values[0], int) else torch.float32
    host = torch.tensor(values or [0], dtype=dtype)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _disable(err: Exception) -> None:
    global enabled
    enabled = False
    log.warning("PMA's Triton delta-code kernels failed (%s); using torch's kernels", err)


@functools.cache
def _kernels():
    """The jitted kernels (a namespace), or None when Triton does not import."""
    try:
        from . import _triton_codes_jit
    except ImportError:
        return None
    return _triton_codes_jit
