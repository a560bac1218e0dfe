"""The averaging states on plain tensors, single process: closed forms, roll-over, dtypes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pma_dist.core import RunningAverage, WindowAverage, window_weights
from pma_dist.kernels import all_finite
from pma_dist.testing import assert_close_rel, merge_reference, window_reference
from tests.support.probes import accelerator_fold

ALPHA = 0.3
SHAPES = [(5, 3), (7,), (0, 4), (2, 2, 2)]


def _like(dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(s, dtype=dtype) for s in SHAPES]


def _constant(value: float, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.full(s, value, dtype=dtype) for s in SHAPES]


def _merged(state, weights) -> list[torch.Tensor]:
    out = _like()
    state.merge_into(out, weights)
    return out


def _window_closed_form(method: str, c: int, n: int) -> float:
    """Merge of the last n of the snapshots 1, 2, ..., c (theta_k = k)."""
    if method == "sma":
        return c - (n - 1) / 2
    if method == "wma":
        return (c - n) + (2 * n + 1) / 3
    return c - (1 - ALPHA) * (1 - (1 - ALPHA) ** (n - 1)) / ALPHA


def _running_closed_form(method: str, c: int) -> float:
    return {"sma": (c + 1) / 2, "wma": (2 * c + 1) / 3}.get(method) or _window_closed_form(
        "ema", c, c
    )


@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_window_closed_forms_through_roll_over(method: str) -> None:
    window = 4
    state = WindowAverage(_like(), window)
    for c in range(1, 2 * window + 2):
        state.snapshot(_constant(float(c)))
        n = min(c, window)
        expected = _window_closed_form(method, c, n)
        for t in _merged(state, window_weights(method, n, ALPHA)):
            assert torch.allclose(t, torch.full_like(t, expected), rtol=1e-6, atol=0), (method, c)


@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_running_closed_forms(method: str) -> None:
    state = RunningAverage(_like(), method, ALPHA)
    for c in range(1, 40):
        state.snapshot(_constant(float(c)))
        expected = _running_closed_form(method, c)
        for t in _merged(state, [1.0]):
            assert torch.allclose(t, torch.full_like(t, expected), rtol=1e-6, atol=0), (method, c)


@pytest.mark.parametrize("on_device", [False, True], ids=["host-read verdict", "device"])
@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_running_folds_only_snapshots_agreed_finite(method: str, on_device: bool) -> None:
    """Snapshots 1..c with every third one rejected (NaN or Inf in it, verdict 0): the slot
    equals the closed form over the accepted ones alone, bf16 live weights too, whether the
    host reads the verdict (CPU) or the lerp is guarded on the device; rejected ones are taken
    out of the count and the record at the agreement."""
    state = RunningAverage(_like(torch.bfloat16), method, ALPHA)
    accepted = 0
    with accelerator_fold() if on_device else contextlib.nullcontext():
        for c in range(1, 25):
            live = _constant(float(accepted + 1), torch.bfloat16)
            bad = c % 3 == 0
            if bad:
                live[0].view(-1)[c % 5] = float("nan") if c % 2 else float("inf")
            state.snapshot(live, step=c, verdict=torch.tensor(0.0 if bad else 1.0))
            if bad:
                assert state.reject(state.next_seq - 1) is not None
            else:
                accepted += 1
            state.settle()
            assert state.count == accepted and state.records[0].step == c - bad
            expected = _running_closed_form(method, accepted)
            for t in _merged(state, [1.0]):
                assert torch.allclose(t, torch.full_like(t, expected), rtol=1e-6, atol=0), c


@pytest.mark.parametrize("method", ["sma", "wma", "ema"])
def test_running_float64_slots_keep_float64_weights_on_the_device(method: str) -> None:
    """With float64 slots the device's weights (1/k, 2/(k+1), alpha) are float64 too: the
    closed forms hold to 1e-12 (alpha rounded to float32 would miss by 1e-8)."""
    state = RunningAverage(_like(torch.float64), method, ALPHA, dtype=torch.float64)
    with accelerator_fold():
        for c in range(1, 30):
            state.snapshot(_constant(float(c), torch.float64), verdict=torch.tensor(1.0))
            expected = _running_closed_form(method, c)
            for t in state.slots[0]:
                assert torch.allclose(t, torch.full_like(t, expected), rtol=1e-12, atol=0), c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_running_16_bit_slots_fold_alike_on_host_and_device(dtype: torch.dtype) -> None:
    """Slots of 16-bit floats (``pma.dtype``): the device's guarded lerp gives the same bits
    as the host's lerp, which computes in float32 with the weight unrounded."""
    torch.manual_seed(3)
    states = [RunningAverage(_like(), "sma", dtype=dtype) for _ in range(2)]
    for _ in range(9):
        live = [torch.randn(s) for s in SHAPES]
        states[0].snapshot(live, verdict=torch.tensor(1.0))
        with accelerator_fold():
            states[1].snapshot(live, verdict=torch.tensor(1.0))
    for host, device in zip(states[0].slots[0], states[1].slots[0]):
        assert host.dtype == dtype and torch.equal(host, device)


def test_window_order_after_wrap_matches_reference_on_random_data() -> None:
    torch.manual_seed(0)
    window, snapshots = 3, []
    state = WindowAverage(_like(), window)
    for _ in range(7):
        snap = [torch.randn(s) for s in SHAPES]
        snapshots.append({str(i): t for i, t in enumerate(snap)})
        state.snapshot(snap)
    assert state.logical_slots() == [1, 2, 0]
    for method in ("sma", "wma", "ema"):
        out = _merged(state, window_weights(method, window, ALPHA))
        expected = window_reference(snapshots, window, method, ALPHA)
        assert_close_rel({str(i): t for i, t in enumerate(out)}, expected, 1e-6, method)


def test_bf16_snapshots_accumulate_in_fp32() -> None:
    torch.manual_seed(1)
    window = WindowAverage(_like(torch.bfloat16), 5)
    running = RunningAverage(_like(torch.bfloat16), "sma")
    live = [torch.randn(s).to(torch.bfloat16) for s in SHAPES]
    snapshots = []
    for _ in range(12):
        live = [(t.float() + 0.01 * torch.randn_like(t.float())).to(torch.bfloat16) for t in live]
        snapshots.append({str(i): t for i, t in enumerate(live)})
        window.snapshot(live)
        running.snapshot(live)
    assert window.slots[0][0].dtype == torch.float32
    as_dict = lambda ts: {str(i): t for i, t in enumerate(ts)}  # noqa: E731
    assert_close_rel(
        as_dict(_merged(window, window_weights("sma", 5))),
        window_reference(snapshots, 5, "sma"),
        1e-6,
    )
    assert_close_rel(as_dict(_merged(running, [1.0])), merge_reference(snapshots, "sma"), 1e-6)
    bf16_out = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    running.merge_into(bf16_out, [1.0])
    expected = merge_reference(snapshots, "sma")
    for i, t in enumerate(bf16_out):
        assert torch.equal(t, expected[str(i)].to(torch.bfloat16)), (
            "merged bf16 is the rounded fp32 average"
        )


def test_offload_cpu_and_float64_slots() -> None:
    state = WindowAverage(_like(), 2, dtype=torch.float64, offload="cpu")
    state.snapshot(_constant(1.0))
    state.snapshot(_constant(2.0))
    assert state.slots[0][0].dtype == torch.float64
    assert all(torch.all(t == 1.5) for t in _merged(state, [0.5, 0.5]))


def test_merge_without_snapshots_and_wrong_shapes_fail() -> None:
    state = WindowAverage(_like(), 2)
    with pytest.raises(RuntimeError, match="no snapshot"):
        state.merge_into(_like(), [])
    with pytest.raises(RuntimeError, match="shard changed"):
        state.snapshot([torch.zeros(5, 3)])


def test_all_finite_sees_nan_and_both_infinities() -> None:
    ok = _constant(1.0)
    assert all_finite(ok).item() == 1.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensors = _constant(1.0)
        tensors[1][3] = bad
        assert all_finite(tensors).item() == 0.0, bad
    mixed = [torch.ones(3, dtype=torch.bfloat16), torch.tensor([1.0, float("nan")])]
    assert all_finite(mixed).item() == 0.0


def test_zero_weight_and_dropped_slots_are_never_read() -> None:
    state = WindowAverage(_like(), 3)
    for value in (1.0, float("nan"), 3.0):
        state.snapshot(_constant(value), step=int(value) if value == value else 2)
    for t in _merged(state, [0.5, 0.0, 0.5]):
        assert torch.equal(t, torch.full_like(t, 2.0)), "a NaN slot with weight 0 leaked in"
    state.drop([1])
    assert [r.step for r in state.merged_records()] == [1, 3]
    for t in _merged(state, [0.5, 0.5]):
        assert torch.equal(t, torch.full_like(t, 2.0))
    state.snapshot(_constant(5.0), step=5)
    assert state.records[1].step == 5, "a dropped slot is the first one a new snapshot takes"
    assert [r.step for r in state.merged_records()] == [1, 3, 5]
    with pytest.raises(ValueError, match="every weight is zero"):
        state.merge_into(_like(), [0.0, 0.0, 0.0])


def test_padding_is_neither_copied_nor_checked() -> None:
    runs = [((0, 4), (8, 3)), None]
    live = [torch.arange(12, dtype=torch.float32), torch.ones(3)]
    live[0][4:8] = float("nan")
    live[0][11] = float("nan")
    state = WindowAverage(live, 2, runs=runs)
    assert bool(all_finite(state.real(live))), "padding read by the check"
    state.snapshot(live)
    slot = state.slots[state.logical_slots()[0]]
    assert torch.equal(slot[0][4:8], torch.zeros(4)) and slot[0][11] == 0, "padding copied"
    assert torch.equal(slot[0][:4], live[0][:4]) and torch.equal(slot[0][8:11], live[0][8:11])
