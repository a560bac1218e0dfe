"""The public Merger surface on a plain module, single process: guards, errors, state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, window_reference
from tests.support.models import full_state, make_model, train_step
from tests.support.probes import judged_snapshot


def _trained(window: int | None = 3, steps: int = 6, method: str = "sma", seed: int = 0):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, PMAConfig(method=method, window=window, interval_steps=2))
    snapshots = []
    for step in range(steps):
        train_step(model, optimizer, step, 0, 1)
        if merger.step():
            snapshots.append(full_state(model))
    return model, optimizer, merger, snapshots


def test_step_reports_snapshots_and_history() -> None:
    _, _, merger, snapshots = _trained(steps=7)
    assert merger.num_snapshots == len(snapshots) == 3
    assert list(merger.history) == [(2, 0), (4, 0), (6, 0)]


def test_guards_leave_live_weights_untouched() -> None:
    model = make_model()
    merger = Merger(model, None, {"window": 2, "interval_steps": 1})
    before = full_state(model)
    with pytest.raises(RuntimeError, match="no PMA snapshot"):
        with merger.swapped():
            pass
    merger.step()
    for kwargs, error in (
        ({"method": "median"}, ValueError),
        ({"weights": [1.0, 2.0]}, ValueError),
        ({"method": "sma", "weights": [1.0]}, ValueError),
    ):
        with pytest.raises(error):
            with merger.swapped(**kwargs):
                pass
    with merger.swapped():
        with pytest.raises(RuntimeError, match="do not nest"):
            with merger.swapped():
                pass
        with pytest.raises(RuntimeError, match="inside swapped"):
            merger.apply()
        with pytest.raises(RuntimeError, match="inside swapped"):
            merger.snapshot()
    assert_bitwise_equal(full_state(model), before, "after refused calls")


def test_running_mode_refuses_other_methods() -> None:
    model, _, merger, _ = _trained(window=None, method="ema")
    with pytest.raises(ValueError, match="running mode"):
        merger.apply("sma")
    with pytest.raises(ValueError, match="running mode"):
        merger.apply(weights=[1.0])
    merger.apply("ema")


def test_merged_shards_and_config_errors() -> None:
    model, _, merger, snapshots = _trained()
    merged = merger.merged_shards("wma")
    assert_close_rel(merged, window_reference(snapshots, 3, "wma"), 1e-6, "merged_shards")
    with pytest.raises(ValueError, match="config is required"):
        Merger(model, None, None)
    frozen = make_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Merger(frozen, None, {"interval_steps": 1})


def test_optimizer_param_groups_choose_what_is_averaged() -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    assert Merger(model, optimizer, {"interval_steps": 1}).names == ["head.weight"]


def test_state_round_trip_through_torch_save() -> None:
    _, _, merger, _ = _trained(steps=10)
    buffer = io.BytesIO()
    torch.save(merger.state_dict(), buffer)
    model2 = make_model(seed=5)
    resumed = Merger(model2, None, PMAConfig(window=3, interval_steps=2))
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert (resumed.num_snapshots, list(resumed.history)) == (
        merger.num_snapshots,
        list(merger.history),
    )
    for method in ("sma", "wma", "ema"):
        assert_bitwise_equal(resumed.merged_shards(method), merger.merged_shards(method), method)


def test_incompatible_state_is_refused_and_nothing_changes() -> None:
    _, _, merger, _ = _trained(steps=10)
    good = merger.state_dict()
    target_model = make_model(seed=3)
    target = Merger(target_model, None, PMAConfig(window=3, interval_steps=2))
    target.step(), target.step()
    before = target.merged_shards()

    other_window = Merger(make_model(), None, PMAConfig(window=4, interval_steps=2)).state_dict()
    running = Merger(make_model(), None, PMAConfig(window=None, interval_steps=2)).state_dict()
    small = torch.nn.Linear(3, 2)
    other_model = Merger(small, None, PMAConfig(window=3, interval_steps=2)).state_dict()
    truncated = {
        **good,
        "slots": {**good["slots"], "2": {k: v[:1] for k, v in good["slots"]["2"].items()}},
    }
    missing = {**good, "slots": {"0": good["slots"]["0"]}}
    for bad, fragment in (
        (other_window, "pma.window = 4"),
        (running, "averaging mode = 'running'"),
        (other_model, "another model"),
        (truncated, "local shape"),
        (missing, "incomplete"),
        ({"count": 1}, "not a Merger.state_dict"),
    ):
        with pytest.raises(PMAStateError, match=fragment):
            target.load_state_dict(bad)
        assert target.num_snapshots == 1
        assert_bitwise_equal(target.merged_shards(), before, f"after refusing {fragment}")


def _poisoned(model, value: float) -> None:
    with torch.no_grad():
        model.mix[1] = value


@pytest.mark.parametrize("window", [3, None])
def test_a_run_of_nonfinite_snapshots_raises_naming_the_tensor(window) -> None:
    from pma_dist import NonFiniteSnapshotError

    model = make_model()
    config = PMAConfig(window=window, interval_steps=1, max_consecutive_skips=3)
    merger = Merger(model, None, config)
    assert judged_snapshot(merger)
    _poisoned(model, float("nan"))
    assert not judged_snapshot(merger) and not judged_snapshot(merger)
    assert (merger.skip_streak, merger.num_skipped) == (2, 2)
    resumed = Merger(model, None, config)
    resumed.load_state_dict(merger.state_dict())
    assert resumed.skip_streak == 2, "the streak is part of the saved state"
    with pytest.raises(NonFiniteSnapshotError) as err:
        judged_snapshot(resumed)
    message = str(err.value)
    assert "3 snapshots in a row" in message and "rank 0: mix" in message, message
    assert "embed.weight" not in message, "only the tensors that held NaN/Inf are named"
    _poisoned(model, 1.0)
    assert judged_snapshot(merger) and merger.skip_streak == 0, "a good snapshot resets the streak"
    _poisoned(model, float("inf"))
    assert not judged_snapshot(merger) and not judged_snapshot(merger), "two in a row: skipped"
    relaxed = Merger(
        model, None, PMAConfig(window=window, interval_steps=1, max_consecutive_skips=None)
    )
    assert not any(judged_snapshot(relaxed) for _ in range(5)) and relaxed.num_skipped == 5


def test_window_snapshots_are_judged_late_and_left_out_of_merges() -> None:
    """A window snapshot is written whatever it holds; the verdict comes at the next agreement
    (a merge, a save, or once a window), and a non-finite one is then left out of merges."""
    model = make_model()
    config = PMAConfig(method="sma", window=4, interval_steps=1, max_consecutive_skips=None)
    merger = Merger(model, None, config)
    taken = []
    for value in (0.5, float("nan"), 1.5):
        _poisoned(model, value)
        assert merger.snapshot(), "a window snapshot is always written"
        taken.append(model.mix.detach().clone())
    assert merger.num_skipped == 0, "nothing is judged before the ranks agree"
    merged = merger.merged_shards()["mix"]
    assert merger.num_skipped == 1 and merger.window_size == 2 and merger.num_snapshots == 2
    assert torch.equal(merged, (taken[0] + taken[2]) / 2), "the NaN snapshot is left out"
    _poisoned(model, float("nan"))
    for _ in range(3):
        merger.snapshot()
    assert merger.num_skipped == 1, "3 pending verdicts of a window of 4: not agreed yet"
    merger.snapshot()
    assert merger.num_skipped == 5, "the 4th pending verdict makes the ranks agree"


def test_running_state_saved_with_verdicts_pending_is_settled_and_resumes() -> None:
    """A running Merger saved while a NaN snapshot's verdict is still pending: the save agrees
    first (the NaN one counted as skipped, the record the last good one), the loaded Merger has
    the same counts and history, and its next fold weighs by the snapshots folded (the SMA of
    the three good snapshots, against float64)."""
    config = PMAConfig(window=None, interval_steps=1, max_consecutive_skips=None)
    model = make_model()
    merger = Merger(model, None, config)
    good = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        if step == 1:
            _poisoned(model, float("nan"))
        else:
            good.append(full_state(model))
        merger.step()
        if step == 1:
            _poisoned(model, 0.0)
    assert (merger.num_snapshots, merger.num_skipped) == (3, 0), "verdicts still pending"
    state = merger.state_dict()
    assert (merger.num_snapshots, merger.num_skipped, merger.history) == (2, 1, [(3, 0)])
    resumed_model = make_model()
    resumed = Merger(resumed_model, None, config)
    resumed.load_state_dict(state)
    assert (resumed.num_snapshots, resumed.num_skipped, resumed.history) == (2, 1, [(3, 0)])
    with torch.no_grad():
        for p, live in zip(resumed_model.parameters(), model.parameters()):
            p.copy_(live + 0.1)
    good.append(full_state(resumed_model))
    resumed.snapshot()
    expected = {k: sum(g[k].double() for g in good) / 3 for k in good[0]}
    assert_close_rel(resumed.merged_shards(), expected, 1e-6, "running SMA after resume")


def test_close_removes_the_hooks_it_installed() -> None:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = PMAConfig(window=2, interval_steps=1, offload="cpu")
    first = Merger(model, optimizer, config)
    with Merger(model, optimizer, config) as second:
        assert len(optimizer._optimizer_step_pre_hooks) == 2
        second.snapshot()
    assert len(optimizer._optimizer_step_pre_hooks) == 1, "leaving the block closes it"
    first.close()
    first.close()
    assert len(optimizer._optimizer_step_pre_hooks) == 0
    with second.swapped():
        pass
