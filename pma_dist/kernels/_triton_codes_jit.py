"""The Triton source of the compressed window's device passes (``_triton_codes`` launches them).

Imported only where Triton is: the import fails without it. Each helper is the integer form of
one rounding of ``csrc/delta_codes.cpp`` (the comments there say why each is exact).
"""

import triton
import triton.language as tl


@triton.jit
def _bits(x):
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def _float(bits):
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nonfinite(bits):
    return (bits & 0x7F800000) == 0x7F800000


@triton.jit
def _bf16_round(bits):
    """The bfloat16 code (uint32) of float32 ``bits``, to nearest even (finite values)."""
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


@triton.jit
def _power_of_two(exponent):
    """2^e as a float32, exactly, for int32 e in [-127, 127] (2^-127 is subnormal)."""
    bits = tl.where(exponent >= -126, (exponent + 127) << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_round(x):
    """|x| <= 448 rounded to float8 e4m3fn to nearest even: (code, value), both exact."""
    bits = _bits(x)
    sign = (bits >> 31) << 31
    magnitude = bits ^ sign
    rounded = ((magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20) << 20
    normal_code = (rounded - (120 << 23)) >> 20
    shifted = _float(magnitude) + 16384.0
    small_code = _bits(shifted) - (141 << 23)
    small_value = shifted - 16384.0
    small = magnitude < (121 << 23)
    code = (tl.where(small, small_code, normal_code) & 0x7F) | (sign >> 24)
    value = _float(tl.where(small, _bits(small_value), rounded) | sign)
    return code, value


@triton.jit
def _e4m3_value(code):
    """The float32 value of an e4m3fn code held in a uint32 (never NaN here), exactly."""
    magnitude = code & 0x7F
    exponent = magnitude >> 3
    normal = (exponent != 0).to(tl.uint32)
    significand = (magnitude & 7) | (normal << 3)
    power = (exponent + 1 - normal + 117) << 23
    value = significand.to(tl.int32).to(tl.float32) * _float(power)
    return _float(_bits(value) | ((code & 0x80) << 24))


@triton.jit
def _block_offsets(row, blocks, BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's blocks, their elements' flat offsets, and which of both are real."""
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    per_row = (row + BLOCK - 1) // BLOCK
    column = (block % per_row)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    offsets = (block // per_row)[:, None] * row + column
    real = block < blocks
    return block, offsets, real, real[:, None] & (column < row)


@triton.jit
def encode_bf16(base, live, delta, bad, numel, TILE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < numel
    r = tl.load(base + offsets, mask=inside, other=0.0)
    x = tl.load(live + offsets, mask=inside, other=0.0).to(tl.float32)
    bits = _bits(x - r)
    changed = _nonfinite(bits)
    bits = tl.where(changed, 0, bits)
    code = _bf16_round(bits)
    after = r + _float(code << 16)
    flag = changed | _nonfinite(_bits(after))
    stored = tl.where(flag, 0, code).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(delta + offsets, stored, mask=inside)
    tl.store(base + offsets, tl.where(flag, r, after), mask=inside)
    tl.atomic_max(bad, tl.max(flag.to(tl.int32), axis=0))


@triton.jit
def encode_fp8(
    base, live, codes, exps, bad, row, blocks, BLOCKS: tl.constexpr, BLOCK: tl.constexpr
):
    block, offsets, real, inside = _block_offsets(row, blocks, BLOCKS, BLOCK)
    r = tl.load(base + offsets, mask=inside, other=0.0)
    x = tl.load(live + offsets, mask=inside, other=0.0).to(tl.float32)
    bits = _bits(x - r)
    changed = _nonfinite(bits)
    bits = tl.where(changed, 0, bits)
    amax = tl.max(((bits << 1) >> 1).to(tl.int32, bitcast=True), axis=1)
    high = amax >> 23
    exponent = tl.where((amax & 0x7FFFFF) <= 0x600000, high - 135, high - 134)
    exponent = tl.where(high == 0, -127, tl.minimum(tl.maximum(exponent, -127), 127))
    down = _power_of_two(-exponent)[:, None]
    up = _power_of_two(exponent)[:, None]
    code, value = _e4m3_round(_float(bits) * down)
    after = r + value * up
    overflow = _nonfinite(_bits(after))
    tl.store(codes + offsets, tl.where(overflow, 0, code).to(tl.uint8), mask=inside)
    tl.store(base + offsets, tl.where(overflow, r, after), mask=inside)
    tl.store(exps + block, (exponent + 127).to(tl.uint8), mask=real)
    flag = (changed | overflow) & inside
    tl.atomic_max(bad, tl.max(tl.max(flag.to(tl.int32), axis=1), axis=0))


@triton.jit
def _finish(out, base, weight, total, offsets, inside):
    r = tl.load(base + offsets, mask=inside, other=0.0)
    merged = (r.to(tl.float64) * tl.load(weight) - total.to(tl.float64)).to(tl.float32)
    if out.dtype.element_ty == tl.bfloat16:  # to nearest even, as torch's copy_ rounds
        merged = _bf16_round(_bits(merged)).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out + offsets, merged.to(out.dtype.element_ty), mask=inside)


@triton.jit
def merge_bf16(out, base, weight, deltas, coeffs, planes, numel, TILE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = offsets < numel
    total = tl.zeros((TILE,), tl.float32)
    for k in range(planes):
        plane = tl.load(deltas + k).to(tl.pointer_type(tl.uint16))
        code = tl.load(plane + offsets, mask=inside, other=0).to(tl.uint32)
        total = total + _float(code << 16) * tl.load(coeffs + k)
    _finish(out, base, weight, total, offsets, inside)


@triton.jit
def merge_fp8(
    out, base, weight, codes, scales, coeffs, planes, row, blocks,
    BLOCKS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    block, offsets, real, inside = _block_offsets(row, blocks, BLOCKS, BLOCK)
    total = tl.zeros((BLOCKS, BLOCK), tl.float32)
    for k in range(planes):
        plane = tl.load(codes + k).to(tl.pointer_type(tl.uint8))
        scale = tl.load(scales + k).to(tl.pointer_type(tl.uint8))
        exponent = tl.load(scale + block, mask=real, other=127).to(tl.int32) - 127
        code = tl.load(plane + offsets, mask=inside, other=0).to(tl.uint32)
        decoded = _e4m3_value(code) * _power_of_two(exponent)[:, None]
        total = total + decoded * tl.load(coeffs + k)
    _finish(out, base, weight, total, offsets, inside)
