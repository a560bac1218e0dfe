"""The Triton kernels of the compressed window's device passes, run by Triton's interpreter on
the CPU (``TRITON_INTERPRET=1``, in a child process so that no other test sees the setting):
the kernel source a GPU compiles, checked against the compiled CPU kernel's bits on the same
inputs and against the float64 merge of the true snapshots within the codes' bound."""

from __future__ import annotations

import pytest
import torch

from tests.support.cli import run_python

pytest.importorskip("triton")


def _layouts():
    """(shape, runs, block, segments): rows not a multiple of the block, a padded flat tensor
    with two runs of real elements, a layout that cuts rows (one scale an element), 0-d."""
    from pma_dist.kernels import delta_segments

    cases = [((5, 300), None, 128), ((1000,), ((3, 400), (500, 333)), 128), ((7, 9), None, 1)]
    cases.append(((), None, 128))
    return [(*case, delta_segments(*case)) for case in cases]


def _planes(code, shape, runs, block):
    """An empty plane of differences and, for fp8, of block exponents (filled with junk)."""
    from pma_dist.kernels import CODE_DTYPES, exps_shape

    delta = torch.full(shape, 7, dtype=CODE_DTYPES[code])
    exps = torch.full(exps_shape(shape, runs, block), 9, dtype=torch.uint8)
    return delta, (exps if code == "fp8" else None)


def _flat(tensor):
    return None if tensor is None else tensor.view(-1)


def _bits(tensor):
    return tensor.reshape(-1).view(torch.uint8)


def _encode_both(code, base, live, layout):
    """Encode ``live`` against copies of ``base`` with the Triton kernel and with the compiled
    CPU kernel, check both bit for bit alike, and return the Triton kernel's
    ``(base, delta, exps, flag)``."""
    from pma_dist.kernels import _codes, _triton_codes

    shape, runs, block, segs = layout
    results = []
    for triton in (True, False):
        r, (delta, exps) = base.clone(), _planes(code, shape, runs, block)
        if triton:
            flag = _triton_codes.encode(
                code, r.view(-1), live.reshape(-1), delta.view(-1), _flat(exps), segs
            )
        else:
            flag = _codes.encode(code, r, live, delta, exps, segs)
        results.append((r, delta, exps, float(flag)))
    where = f"{code} {shape} runs={runs} block={block} live {live.dtype}"
    for name, a, b in zip(("base", "delta", "exps", "verdict"), *results):
        same = a == b if isinstance(a, float) else a is b or torch.equal(_bits(a), _bits(b))
        assert same, f"{where}: the {name} differs from the CPU kernel's"
    return results[0]


def _merge_both(code, out_dtype, base, planes, weight, segs):
    """``weight * base - sum_k P_k deq(d_k)`` by the Triton kernel and by the CPU kernel into
    NaN-filled outputs of ``out_dtype``; both, checked bit for bit alike."""
    from pma_dist.kernels import _codes, _triton_codes

    outs = [torch.full(base.shape, float("nan"), dtype=out_dtype) for _ in range(2)]
    terms = [(d.view(-1), _flat(e), p) for d, e, p in planes]
    assert _triton_codes.merge(code, outs[0].view(-1), base.view(-1), weight, terms, segs)
    _codes.merge(code, outs[1], base, weight, planes, segs)
    assert torch.equal(_bits(outs[0]), _bits(outs[1])), f"{code} {out_dtype} merge differs"
    return outs[0]


def _encode_cases(code: str) -> None:
    for layout in _layouts():
        shape, _, _, segs = layout
        base = torch.randn(shape)
        for live_dtype in (torch.float32, torch.bfloat16):
            _encode_both(code, base, (base + 1e-3 * torch.randn(shape)).to(live_dtype), layout)
        if not shape:
            continue
        live = base + 1e-3 * torch.randn(shape)
        flat, flat_base = live.view(-1), base.view(-1)
        at, end = segs[0].start, segs[-1].start + segs[-1].numel
        flat[end - 1], flat[at + 1] = float("nan"), float("inf")
        flat[at + 2], flat_base[at + 2] = 3.39e38, -3.39e38  # a difference past float32
        flat[at + 3], flat_base[at + 3] = 3.4e38, 0.0  # a finite one whose code rounds past it
        flat[at + 4] = flat_base[at + 4] + 1e-41  # a subnormal difference: scale 2^-127
        flat_base[at + 5], flat[at + 5] = 0.0, 448 * 2.0**-12  # 1.75 * 2^k: the scale's edge
        r, delta, _, flag = _encode_both(code, base, live, layout)
        assert flag == 0.0, f"{code}: NaN/Inf and an overflow were not seen"
        assert torch.isfinite(r).all() and torch.isfinite(delta.float()).all()


def _merge_cases(code: str) -> None:
    from pma_dist.kernels import _triton_codes
    from pma_dist.testing import assert_compressed_merge

    shape, runs, block, segs = _layouts()[0]
    chain = [torch.randn(shape)]
    for _ in range(5):
        chain.append(chain[-1] + 1e-3 * torch.randn(shape))
    for snapshot in chain:  # a block near 2^-126: its scale times a weight is subnormal
        snapshot[0, :128] = 1e-38 * torch.randn(128)
    base = chain[0].clone()
    planes = [_planes(code, shape, runs, block) for _ in chain[1:]]
    for snapshot, (delta, exps) in zip(chain[1:], planes):
        _triton_codes.encode(
            code, base.view(-1), snapshot.view(-1), delta.view(-1), _flat(exps), segs
        )
    weights = [0.1, 0.25, 0.7, 1.3, 0.9, 2.1]
    terms = [(d, e, sum(weights[: k + 1])) for k, (d, e) in enumerate(planes)]
    reference = [{"w": s.double()} for s in chain]
    merged = _merge_both(code, torch.float32, base, terms, sum(weights), segs)
    assert_compressed_merge({"w": merged}, reference, weights, code, "triton merge")
    _merge_both(code, torch.bfloat16, base, terms, sum(weights), segs)
    delta, exps = planes[-1]
    assert _triton_codes.merge(
        code, base.view(-1), base.view(-1), 1.0, [(delta.view(-1), _flat(exps), 1.0)], segs
    )
    assert_compressed_merge({"w": base}, reference, [0, 0, 0, 0, 1, 0], code, "rewind")


def _cases() -> None:
    torch.manual_seed(0)
    for code in ("bf16", "fp8"):
        _encode_cases(code)
        _merge_cases(code)
    print("triton code cases passed")


def test_triton_delta_codes_write_the_cpu_kernels_bits() -> None:
    """Encode (float32 and bfloat16 live tensors, rows not a multiple of the block, padded runs,
    one scale an element, 0-d, NaN/Inf, a difference past float32, a subnormal scale) leaves the
    base, planes, exponents and verdict of the compiled CPU kernel; merges into float32 and
    bfloat16 equal the CPU kernel's and lie within the bound of the float64 merge; a rewind
    (the base as the output) too."""
    done = run_python("from tests.test_triton_codes import _cases; _cases()", TRITON_INTERPRET="1")
    assert done.returncode == 0 and "triton code cases passed" in done.stdout, done.stderr[-3000:]
