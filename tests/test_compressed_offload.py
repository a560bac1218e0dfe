"""The compressed window kept in host memory for accelerator tensors (``offload = "cpu"``):
snapshots staged into a host copy and encoded there by a worker thread (``core/_staged``).
Here the staged path runs on CPU tensors, which take it the way device tensors do but for the
side stream (tests/test_gpu.py has the device case)."""

from __future__ import annotations

import pytest
import torch

from pma_dist.core import CompressedWindow
from pma_dist.core._staged import HostStaging
from pma_dist.kernels import BLOCK
from pma_dist.testing import assert_bitwise_equal, assert_compressed_merge

SHAPES = [(40, 300), (257,), ()]
BLOCKS = [BLOCK, 1, BLOCK]


def _states(code: str, window: int) -> tuple[CompressedWindow, CompressedWindow]:
    like = [torch.zeros(s) for s in SHAPES]
    staged = CompressedWindow(like, window, code=code, blocks=BLOCKS, stage=True)
    direct = CompressedWindow(like, window, code=code, blocks=BLOCKS, stage=False)
    return staged, direct


@pytest.mark.parametrize("code", ["bf16", "fp8"])
def test_staged_snapshots_are_the_direct_ones_bit_for_bit(code: str) -> None:
    """Staged snapshots equal direct ones bit for bit (planes, verdicts, merges, a rewind),
    though the live tensors are overwritten with NaN as soon as each snapshot returns, as the
    next optimizer step overwrites them: the staging copy was taken first."""
    torch.manual_seed(0)
    staged, direct = _states(code, 4)
    theta = [torch.randn(s) * 0.02 for s in SHAPES]
    flags, chain = [], []
    for k in range(7):
        theta = [t + 1e-4 * torch.randn(t.shape) for t in theta]
        live = [t.clone() for t in theta]
        if k == 3:
            live[0].view(-1)[17] = float("nan")
        expected = float(direct.snapshot([t.clone() for t in live], step=k, check=True))
        flag = staged.snapshot(live, step=k, check=True)
        for t in live:
            t.fill_(float("nan"))
        staged.wait_host()
        flags.append((float(flag), expected))
        chain.append({str(i): t.double() for i, t in enumerate(theta)})
    assert flags == [(1.0, 1.0)] * 3 + [(0.0, 0.0)] + [(1.0, 1.0)] * 3
    for (key, a), (_, b) in zip(staged.stored(), direct.stored()):
        assert_bitwise_equal(dict(enumerate(a)), dict(enumerate(b)), key)
    for state in (staged, direct):
        out = [torch.full(s, float("nan")) for s in SHAPES]
        state.merge_into(out, [0.1, 0.2, 0.3, 0.4])
        merged = {str(i): t for i, t in enumerate(out)}
        assert_compressed_merge(merged, chain, [0, 0, 0, 0.1, 0.2, 0.3, 0.4], code, "staged")
    staged.drop_since(6)
    direct.drop_since(6)
    assert_bitwise_equal(dict(enumerate(staged.slots[0])), dict(enumerate(direct.slots[0])), "R")


def test_a_failed_host_encode_is_raised_by_the_next_wait() -> None:
    staging = HostStaging([torch.zeros(3)], {})

    def broken(tensors):
        raise ValueError("no room")

    staging.start([torch.ones(3)], broken)
    with pytest.raises(RuntimeError, match="host encode of the last snapshot failed") as caught:
        staging.join()
    assert isinstance(caught.value.__cause__, ValueError)
    staging.join()  # raised once, then clear


def test_a_failed_host_encode_empties_the_window_and_the_next_snapshot_starts_anew(
    monkeypatch,
) -> None:
    """The base may be half updated by an encode that failed: the window is emptied when the
    failure is raised, so no merge reads it, and the next snapshot starts a new chain."""
    from pma_dist.core import _compressed

    staged, _ = _states("fp8", 3)
    snapshots = [[torch.randn(s) * 0.02 for s in SHAPES] for _ in range(3)]
    staged.snapshot(snapshots[0])
    staged.snapshot(snapshots[1])
    staged.wait_host()

    def broken(*args, **kwargs):
        raise MemoryError("the host ran out")

    monkeypatch.setattr(_compressed, "encode_delta", broken)
    staged.snapshot(snapshots[2])
    with pytest.raises(RuntimeError, match="host encode"):
        staged.wait_host()
    assert staged.chain() == [] and staged.count == 0
    monkeypatch.undo()
    staged.snapshot(snapshots[0])
    out = [torch.full(s, float("nan")) for s in SHAPES]
    staged.merge_into(out, [1.0])
    assert_bitwise_equal(dict(enumerate(out)), dict(enumerate(snapshots[0])), "a new chain")
