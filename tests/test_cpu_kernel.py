"""The compiled CPU copy kernel of window snapshots: copies bit for bit what torch's ``copy_``
writes, finds every NaN/Inf that ``torch.isfinite`` finds (and nothing else), at one and two
threads; the snapshot path uses it; without a compiler everything still works, on the blocked
path, after one warning."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

from pma_dist import Merger, PMAConfig
from pma_dist.kernels import _cpu as cpu_kernels
from pma_dist.kernels import copy_checked
from tests.support.cli import run_python
from tests.support.probes import counted_calls

GRAIN = 1 << 16
PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
]
SIZES = [0, 1, 7, GRAIN - 1, GRAIN, 3 * GRAIN + 17]


def _compiler_present() -> bool:
    return bool(shutil.which(os.environ.get("CXX", "c++")) and shutil.which("ninja"))


@pytest.fixture(scope="module")
def kernel_built() -> None:
    if not _compiler_present():
        pytest.skip("no C++ compiler or ninja: the kernel cannot be built here")
    assert cpu_kernels.built() is not None, "a compiler is present but the kernel did not build"


needs_kernel = pytest.mark.usefixtures("kernel_built")


INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(INT_OF_SIZE[tensor.element_size()])


def _special_values(dtype: torch.dtype) -> tuple[list[float], list[torch.Tensor]]:
    """Finite extremes, and non-finite values including NaNs of other payloads and signs."""
    info = torch.finfo(dtype)
    finite = [info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0]
    width = INT_OF_SIZE[info.bits // 8]
    exponent = {16: 0x7C00 if dtype == torch.float16 else 0x7F80, 32: 0x7F800000}.get(
        info.bits, 0x7FF0000000000000
    )
    nans = [torch.tensor(exponent | 1, dtype=width).view(dtype)]  # a signalling NaN
    nans += [torch.tensor(float(v), dtype=dtype) for v in ("nan", "inf", "-inf")]
    nans.append(-torch.tensor(float("nan"), dtype=dtype))
    return finite, nans


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("slot_dtype, live_dtype", PAIRS)
def test_copies_bit_for_bit_and_finds_exactly_the_nonfinite(slot_dtype, live_dtype, threads):
    """Every size (empty, one element, either side of the parallel grain) into a view of a
    NaN-filled buffer: the slot equals torch's ``copy_`` bit for bit, nothing outside it is
    written, and the verdict equals ``torch.isfinite(...).all()`` for finite extremes
    (largest, subnormal, signed zero) and for NaN/Inf at the first, a grain edge, the middle
    (where two threads split the work) and the last."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        finite_values, nonfinite = _special_values(live_dtype)
        for numel in SIZES:
            backing = torch.full((numel + 40,), float("nan"), dtype=slot_dtype)
            out = backing[13 : 13 + numel]
            live = torch.randn(numel).to(live_dtype)
            for i, value in enumerate(finite_values[:numel]):
                live[(i * 7919) % numel] = value
            assert cpu_kernels.copy_finite(out, live) is True, f"{numel} finite elements"
            expected = torch.empty_like(out).copy_(live)
            assert torch.equal(_bits(out), _bits(expected)), f"{numel}: differs from copy_"
            assert backing[:13].isnan().all() and backing[13 + numel :].isnan().all()
            for where in {0, min(GRAIN, numel - 1), numel // 2, numel - 1} if numel else ():
                for bad in nonfinite:
                    poisoned = live.clone()
                    poisoned[where] = bad
                    assert not torch.isfinite(poisoned).all()
                    verdict = cpu_kernels.copy_finite(out, poisoned)
                    assert verdict is False, f"{bad} at {where} of {numel} was not seen"
                    assert torch.equal(_bits(out), _bits(torch.empty_like(out).copy_(poisoned)))
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_refuses_pairs_it_does_not_handle():
    """Narrowing copies, integers, strided views and unequal sizes are not the kernel's: it
    says so (naming the dtypes) instead of writing anything."""
    slot = torch.zeros(8)
    refused = [
        (torch.zeros(8, dtype=torch.bfloat16), torch.ones(8)),
        (torch.zeros(8, dtype=torch.int32), torch.ones(8, dtype=torch.int32)),
        (slot, torch.ones(16)[::2]),
        (slot, torch.ones(9)),
    ]
    for out, live in refused:
        assert not cpu_kernels.suits(out, live)
        with pytest.raises(ValueError, match=str(live.dtype)):
            cpu_kernels.copy_finite(out, live)
    assert torch.equal(slot, torch.zeros(8)), "a refused copy wrote nothing"


@needs_kernel
def test_copy_checked_mixes_kernel_and_blocked_copies():
    """A group of same-dtype tensors (the kernel's) and fp16 ones widened into fp32 slots (the
    blocked path's): the copies equal ``copy_`` and the flag equals ``isfinite`` of everything
    copied, wherever the NaN is. Two values of 3e38 are finite: the kernel is exact where the
    blocked path's sum would overflow."""
    torch.manual_seed(1)
    lives = [torch.randn(5000), torch.randn(300, 40).half(), torch.randn(70000), torch.randn(3)]
    outs = [torch.empty(live.shape) for live in lives]
    assert [cpu_kernels.suits(o, x) for o, x in zip(outs, lives)] == [True, False, True, True]
    assert float(copy_checked(outs, lives)) == 1.0
    assert all(torch.equal(o, x) for o, x in zip(outs, lives))
    for index in range(len(lives)):
        poisoned = [x.clone() for x in lives]
        poisoned[index].view(-1)[-1] = float("nan")
        assert float(copy_checked(outs, poisoned)) == 0.0, f"NaN in tensor {index} missed"
    huge = torch.full((2,), 3e38)
    assert float(copy_checked([torch.empty(2)], [huge])) == 1.0


@needs_kernel
def test_window_snapshot_on_cpu_copies_through_the_kernel():
    """The default window snapshot of a CPU model (fp32 and bf16 weights into fp32 slots)
    copies every tensor through the kernel, once, with no collective and no host sync."""
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8).to(torch.bfloat16))
    merger = Merger(model, None, PMAConfig(window=3, interval_steps=1))
    with counted_calls((cpu_kernels, "copy_finite")) as calls:
        merger.snapshot()
    assert dict(calls) == {"copy_finite": len(list(model.parameters()))}, dict(calls)
    merged = merger.merged_shards()
    for name, param in model.named_parameters():
        assert torch.equal(merged[name], param.detach().float()), name


def test_without_a_compiler_snapshots_fall_back_after_one_warning(tmp_path):
    """With no compiler the build fails once, with a warning that names the cause; copies and
    verdicts come from the blocked path and are still right."""
    code = (
        "import torch\n"
        "from pma_dist.kernels import copy_checked\n"
        "from pma_dist.kernels import _cpu as cpu_kernels\n"
        "x = torch.randn(100000); out = torch.empty_like(x)\n"
        "assert float(copy_checked([out], [x])) == 1.0 and torch.equal(out, x)\n"
        "x[-1] = float('inf')\n"
        "assert float(copy_checked([out], [x])) == 0.0 and torch.equal(out, x)\n"
        "assert not cpu_kernels.suits(out, x)\n"
        "print('fallback ok')\n"
    )
    done = run_python(
        code,
        CXX=str(tmp_path / "no-such-compiler"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
    )
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "could not be built" in line]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0], done.stderr[-3000:]


@needs_kernel
def test_a_build_killed_midway_does_not_stall_the_next(tmp_path):
    """A rank killed while building leaves torch's lock file and a torn module behind; the next
    process builds anyway (under an flock, which the system releases with its holder) instead
    of waiting on that lock file forever, and its copies are right."""
    name = cpu_kernels.module_name()
    left = tmp_path / "pma_dist" / name
    left.mkdir(parents=True)
    (left / "lock").write_text("")
    (left / f"{name}.so").write_bytes(b"\x7fELF torn by a kill")
    code = (
        "import torch\n"
        "from pma_dist.kernels import _cpu as cpu_kernels\n"
        "assert cpu_kernels.built() is not None, 'not built'\n"
        "x = torch.randn(1000); out = torch.empty_like(x)\n"
        "assert cpu_kernels.copy_finite(out, x) and torch.equal(out, x)\n"
        "print('rebuilt ok')\n"
    )
    done = run_python(code, timeout=240, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert done.returncode == 0 and "rebuilt ok" in done.stdout, done.stderr[-3000:]
