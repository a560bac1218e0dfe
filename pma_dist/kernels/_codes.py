"""The compressed window's delta codes: how a snapshot's difference from the base is stored in
fewer bits, and the two passes over memory that use them.

* ``bf16``: each difference rounded to bfloat16 (2 bytes an element).
* ``fp8``: float8 e4m3 with one power-of-two scale per block of 128 elements (``BLOCK``) along a
  row (the microscaling form of OCP's MX formats: an E8M0 exponent per block): 1 byte an
  element and 1 per block. A power of two makes every decoded value exact in float32 and in
  bfloat16, so a state can be decoded, moved and encoded again without a second rounding.

``encode`` writes d = q(live - base) and adds deq(d) to the base (error feedback: the base is
then the snapshot up to one rounding of the last difference); where ``live`` is NaN/Inf, or a
finite difference or the base would round past float32's range (|d| near 3.4e38), it stores 0
and leaves the base as it is, so no plane ever holds a non-finite value, and says so.
``merge`` writes ``W * base - S`` with ``S = sum_k deq(d_k) * P_k`` summed in float32 (small
values: its rounding is far below the codes') and the subtraction in float64, rounded once.
On CPU both run as compiled kernels (``_cpu``), on CUDA as Triton kernels (``_triton_codes``);
elsewhere, or without a compiler, the torch expressions here do the same work with the same
bits.

Blocks lie along rows (``_segments``): the last dimension of a tensor, or each run of real
elements of a padded flat partition. A run is what the owner hands over: one parameter's shard
of a padded FSDP2 tensor, but a DeepSpeed flat partition is one run that holds many parameters
end to end, so there a block may span the end of one parameter and the start of the next (its
scale then fits the larger of the two).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from . import _cpu, _triton_codes
from ._segments import Segment, exps_of, pieces

CODES = ("bf16", "fp8")
"""Delta codes, by the name ``PMAConfig.compression`` takes."""
E4M3_MAX = 448.0
"""The largest float8 e4m3 value; a block's largest difference is scaled to at most this."""
EXPONENT_BIAS = 127
"""A block's scale 2^e is stored as the byte e + 127."""
CODE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.uint8}
"""How a code's differences are stored (fp8 codes as their raw bytes)."""


def block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """Per block, the smallest e with ``amax <= 448 * 2^e`` (int32), within E8M0's range."""
    mantissa, power = torch.frexp(amax)
    exponent = torch.where(mantissa <= 0.875, power - 9, power - 8)
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -EXPONENT_BIAS))
    return exponent.clamp_(-EXPONENT_BIAS, EXPONENT_BIAS)


def encode(
    code: str,
    base: torch.Tensor,
    live: torch.Tensor,
    delta: torch.Tensor,
    exps: torch.Tensor | None,
    segs: Sequence[Segment],
) -> torch.Tensor:
    """Encode ``live`` against ``base`` (both shaped alike) into ``delta`` (and ``exps``) over
    ``segs``; a 0-dim float flag on their device: 1.0 when every element was finite. No host
    sync off the CPU. ``live`` may have any strides (``base``, ``delta`` and ``exps`` are the
    window's own, contiguous): a channels_last weight is read through a contiguous copy."""
    flat_base, flat_live, flat_delta = base.view(-1), live.reshape(-1), delta.view(-1)
    flat_exps = exps.view(-1) if exps is not None else None
    flag = torch.ones((), device=base.device)
    if _cpu.suits_code(code, base, live):
        finite = True
        for seg in segs:
            views = _views(seg, flat_base, flat_live, flat_delta, flat_exps)
            finite = _cpu.encode(code, *views, seg.rows, seg.row, seg.block) and finite
        return flag if finite else flag.zero_()
    if _triton_codes.suits_code(code, base, flat_live):
        found = _triton_codes.encode(code, flat_base, flat_live, flat_delta, flat_exps, segs)
        if found is not None:
            return found
    flags = [
        _encode_torch(code, *_views(piece, flat_base, flat_live, flat_delta, flat_exps), piece)
        for piece in pieces(segs)
    ]
    return torch.stack(flags).all().float() if flags else flag


def merge(
    code: str,
    out: torch.Tensor,
    base: torch.Tensor,
    weight: float,
    planes: Sequence[tuple[torch.Tensor, torch.Tensor | None, float]],
    segs: Sequence[Segment],
) -> None:
    """``out = weight * base - sum_k coeff_k * deq(delta_k)`` over ``segs``, ``planes`` being
    ``(delta_k, exps_k, coeff_k)``; ``out`` may be ``base`` itself, any float dtype and any
    strides (a channels_last weight is merged into a contiguous copy first) and may live on
    the device when the window is in host memory (merged on the host, then copied)."""
    if not out.is_contiguous() or out.device != base.device:
        staged = torch.zeros(out.shape, dtype=torch.float32, device=base.device)  # padding: 0
        merge(code, staged, base, weight, planes, segs)
        out.copy_(staged)
        return
    compiled = _cpu.suits_code(code, base) and out.device.type == "cpu"
    direct = out.dtype == torch.float32 and out.is_contiguous()
    flat_out, flat_base = out.view(-1), base.view(-1)
    flat_planes = [(d.view(-1), e.view(-1) if e is not None else None, c) for d, e, c in planes]
    if out.dtype in _triton_codes.OUT_DTYPES and _triton_codes.suits_code(code, base):
        if _triton_codes.merge(code, flat_out, flat_base, weight, flat_planes, segs):
            return
    for piece in segs if compiled and direct else pieces(segs):
        lo, hi = piece.start, piece.start + piece.numel
        sliced = [(d[lo:hi], exps_of(e, piece), c) for d, e, c in flat_planes]
        target = flat_out[lo:hi] if direct else torch.empty(hi - lo, device=base.device)
        if compiled:
            rows, row, block = piece.rows, piece.row, piece.block
            _cpu.merge(code, target, flat_base[lo:hi], weight, sliced, rows, row, block)
        else:
            _merge_torch(code, target, flat_base[lo:hi], weight, sliced, piece)
        if not direct:
            flat_out[lo:hi].copy_(target)


def powers_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` in float32, exactly, for int32 exponents in [-127, 127] (built from
    the bits: 2^-127 is a subnormal)."""
    bits = torch.where(
        exponent >= -126, (exponent + 127) << 23, torch.ones_like(exponent) << (exponent + 149)
    )
    return bits.view(torch.float32)


def _views(piece: Segment, base, live, delta, exps) -> tuple:
    lo, hi = piece.start, piece.start + piece.numel
    return base[lo:hi], live[lo:hi], delta[lo:hi], exps_of(exps, piece)


def _blocked(flat: torch.Tensor, piece: Segment) -> torch.Tensor:
    """``flat`` (a piece's elements) as ``[rows, blocks per row, block]``, zero-padded."""
    rows = flat.view(piece.rows, piece.row)
    pad = piece.per_row * piece.block - piece.row
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.view(piece.rows, piece.per_row, piece.block)


def _unblocked(blocks: torch.Tensor, piece: Segment) -> torch.Tensor:
    return blocks.reshape(piece.rows, -1)[:, : piece.row].reshape(-1)


def _encode_torch(code, base, live, delta, exps, piece: Segment) -> torch.Tensor:
    diff = live.float() - base
    finite = torch.isfinite(diff)
    zero = torch.zeros((), device=diff.device)
    diff = torch.where(finite, diff, zero)
    if code == "bf16":
        stored = diff.to(torch.bfloat16)
        values = stored.float()
    else:
        exponent = block_exponents(_blocked(diff.abs(), piece).amax(-1)).int()
        down = powers_of_two(-exponent).unsqueeze(-1)
        codes = (_blocked(diff, piece) * down).to(torch.float8_e4m3fn)
        values = _unblocked(codes.float() * powers_of_two(exponent).unsqueeze(-1), piece)
        stored = _unblocked(codes.view(torch.uint8), piece)
        exps.copy_((exponent + EXPONENT_BIAS).to(torch.uint8).reshape(-1))
    updated = base + values
    kept = torch.isfinite(updated)
    delta.copy_(torch.where(kept, stored, torch.zeros((), dtype=stored.dtype, device=diff.device)))
    base.copy_(torch.where(kept, updated, base))
    return finite.all() & kept.all()


def _merge_torch(code, out, base, weight, planes, piece: Segment) -> None:
    terms = ((decoded(code, delta, exps, piece), coeff) for delta, exps, coeff in planes)
    out.copy_(merge_values(base, weight, terms).view(out.shape))


def merge_values(
    base: torch.Tensor, weight: float, terms: Iterable[tuple[torch.Tensor, float]]
) -> torch.Tensor:
    """``weight * base - sum_k values_k * coeff_k`` for decoded differences ``values_k``, with
    the roundings of :func:`merge` (the sum in float32, the subtraction in float64)."""
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for values, coeff in terms:
        total += values * float(torch.tensor(coeff, dtype=torch.float32))
    return (base.double() * weight - total.double()).float()


def decode(
    code: str, delta: torch.Tensor, exps: torch.Tensor | None, segs: Sequence[Segment]
) -> torch.Tensor:
    """The float32 values of a whole plane of differences laid out as ``segs`` say (elements
    outside them: 0)."""
    out = torch.zeros(delta.shape, dtype=torch.float32, device=delta.device)
    flat_out, flat_delta = out.view(-1), delta.view(-1)
    flat_exps = exps.view(-1) if exps is not None else None
    for piece in pieces(segs):
        lo, hi = piece.start, piece.start + piece.numel
        flat_out[lo:hi] = decoded(code, flat_delta[lo:hi], exps_of(flat_exps, piece), piece)
    return out


def decode_elements(
    codes: torch.Tensor, exps: torch.Tensor, segs: Sequence[Segment], start: int
) -> torch.Tensor:
    """The float32 values of fp8 ``codes``, elements ``[start, start + len(codes))`` of a tensor
    whose blocks lie as ``segs`` say and whose block exponents are ``exps`` (flat, whole)."""
    offsets = torch.arange(start, start + codes.numel(), dtype=torch.int64)
    starts = torch.tensor([s.start for s in segs], dtype=torch.int64)
    which = torch.searchsorted(starts, offsets, right=True) - 1
    if codes.numel() and (which < 0).any():
        raise ValueError(f"elements from {start} lie outside every block segment")
    fields = torch.tensor(
        [(s.start, s.row, s.block, s.per_row, s.exps_start) for s in segs], dtype=torch.int64
    ).view(-1, 5)[which]
    within = offsets - fields[:, 0]
    rows, columns = within // fields[:, 1], within % fields[:, 1]
    blocks = fields[:, 4] + rows * fields[:, 3] + columns // fields[:, 2]
    exponent = exps.view(-1)[blocks].int() - EXPONENT_BIAS
    return codes.view(torch.float8_e4m3fn).float() * powers_of_two(exponent)


def decoded(
    code: str, delta: torch.Tensor, exps: torch.Tensor | None, piece: Segment
) -> torch.Tensor:
    """The float32 values of a piece's stored differences (exact: no rounding)."""
    if code == "bf16":
        return delta.float()
    values = _blocked(delta.view(torch.float8_e4m3fn).float(), piece)
    scale = powers_of_two(exps.view(piece.rows, piece.per_row).int() - EXPONENT_BIAS)
    return _unblocked(values * scale.unsqueeze(-1), piece)
