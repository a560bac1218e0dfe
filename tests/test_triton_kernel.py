"""The Triton copy-and-sum kernel of GPU snapshots, run by Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``, in a child process so that no other test sees the setting): the same
kernel source a GPU compiles, checked against torch's own ``copy_`` and a float64 sum."""

from __future__ import annotations

import pytest
import torch

from tests.support.cli import run_python

pytest.importorskip("triton")


def _cases() -> None:
    from pma_dist.kernels import _triton as triton_kernels

    block = triton_kernels.BLOCK
    torch.manual_seed(0)
    numel = 3 * block + 17
    backing = torch.full((numel + 64,), float("nan"))
    cases = [
        (torch.empty(numel).fill_(float("nan")), torch.randn(numel)),
        (torch.empty(2, block + 3), torch.randn(2, block + 3, dtype=torch.bfloat16)),
        (torch.empty(numel, dtype=torch.float64), torch.randn(numel, dtype=torch.float16)),
        (backing[31 : 31 + numel], torch.randn(numel)),
    ]
    dst, src = [d for d, _ in cases], [s for _, s in cases]
    total = triton_kernels.copy_sum(dst, src)
    for i, (out, live) in enumerate(cases):
        expected = torch.empty_like(out).copy_(live)
        assert torch.equal(out, expected), f"case {i}: the copy differs from torch's copy_"
    assert backing[:31].isnan().all() and backing[31 + numel :].isnan().all(), "wrote outside"
    reference = sum(float(out.double().sum()) for out in dst)
    assert abs(float(total) - reference) <= 1e-4 * sum(float(o.double().abs().sum()) for o in dst)

    for poison, where in ((float("nan"), numel - 1), (float("inf"), block), (-float("inf"), 0)):
        live = torch.randn(numel)
        live[where] = poison
        flag = torch.isfinite(triton_kernels.copy_sum([torch.empty(numel)], [live]))
        assert not bool(flag), f"{poison} at {where} of {numel} was not seen"
    print("kernel cases passed")


def test_kernel_copies_exactly_and_sums_what_it_wrote() -> None:
    """Sizes not divisible by the block, widening copies (bf16 and fp16 live weights into
    fp32/fp64 slots), a view into a NaN-filled buffer (nothing outside it written), NaN/Inf at
    the first, a block-edge and the last element all behave."""
    done = run_python("from tests.test_triton_kernel import _cases; _cases()", TRITON_INTERPRET="1")
    assert done.returncode == 0 and "kernel cases passed" in done.stdout, done.stderr[-3000:]
