"""Loss-spike recovery: a burst of huge learning rate blows the loss up; the guard rolls the
weights back to the merge of the healthy snapshots and the run carries on from there."""

from __future__ import annotations

import pytest
import torch

from pma_dist import Merger, PMAConfig, SpikeGuard, SpikeGuardConfig, SpikeRecoveryExhausted
from pma_dist.testing import run_ranks
from tests.support.models import counting_batch, loss_of, make_model, shard_fsdp2

SPIKE = range(50, 52)


def _train(model, optimizer, merger, guard, steps=70, spike=SPIKE, spike_lr=0.3, rank=0, world=1):
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = spike_lr if step in spike else 3e-3
        loss = loss_of(model, counting_batch(step, rank, world))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        merger.step()
        losses.append(loss.item())
        if guard is not None:
            guard.observe(loss)
    return losses


def _setup(seed=0):
    model = make_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, optimizer, Merger(model, optimizer, PMAConfig(window=5, interval_steps=2))


def test_guard_brings_the_run_back() -> None:
    model, optimizer, merger = _setup()
    unguarded = _train(model, optimizer, merger, None)
    model, optimizer, merger = _setup()
    guard = SpikeGuard(merger, optimizer, SpikeGuardConfig(last_k=4))
    guarded = _train(model, optimizer, merger, guard)
    before = unguarded[SPIKE.start - 1]
    assert max(unguarded[SPIKE.stop :]) > 10 * before, "the burst must blow the loss up"
    assert unguarded[SPIKE.stop + 4] > 5 * before, "without the guard the run stays broken"
    assert guarded[SPIKE.stop + 4] < 2 * before, "with the guard the run is back on track"
    (recovery,) = guard.recoveries
    assert recovery["step"] == SPIKE.stop and recovery["snapshots_merged"] == 4
    assert max(recovery["snapshot_steps"]) <= SPIKE.start, "only snapshots from before the burst"
    assert guarded[: SPIKE.stop] == unguarded[: SPIKE.stop]


def test_persistent_divergence_stops_after_max_recoveries() -> None:
    model, optimizer, merger = _setup()
    guard = SpikeGuard(merger, optimizer, SpikeGuardConfig(max_recoveries=2))
    with pytest.raises(SpikeRecoveryExhausted, match="after 2 recoveries"):
        _train(model, optimizer, merger, guard, spike=range(50, 70), spike_lr=1.0)
    assert len(guard.recoveries) == 2


def test_non_finite_loss_is_a_spike_and_bad_settings_are_refused() -> None:
    model, optimizer, merger = _setup()
    guard = SpikeGuard(merger, optimizer)
    _train(model, optimizer, merger, guard, steps=12, spike=())
    assert guard.observe(float("nan")) and len(guard.recoveries) == 1
    assert not any(optimizer.state.values()), "moments were reset"
    with pytest.raises(ValueError, match="factor = 0.5"):
        SpikeGuardConfig(factor=0.5)
    running = Merger(model, optimizer, PMAConfig(window=None, interval_steps=1))
    with pytest.raises(ValueError, match="window mode"):
        SpikeGuard(running, optimizer)


def _fsdp2_worker(rank: int, world_size: int) -> dict:
    model = shard_fsdp2(make_model(seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    merger = Merger(model, optimizer, PMAConfig(window=5, interval_steps=2))
    guard = SpikeGuard(merger, optimizer, SpikeGuardConfig(last_k=4))
    losses = _train(model, optimizer, merger, guard, rank=rank, world=world_size)
    return {"recoveries": guard.recoveries, "losses": losses}


def test_ranks_recover_together_under_fsdp2() -> None:
    r0, r1 = run_ranks(_fsdp2_worker, 2)
    assert r0["recoveries"] == r1["recoveries"] and len(r0["recoveries"]) == 1
    assert r0["losses"][SPIKE.stop + 4] < 2 * r0["losses"][SPIKE.start - 1]


def _recorded_run(guard_config: SpikeGuardConfig, pma: PMAConfig, spikes, steps: int = 72):
    """Train through ``spikes`` with a guard; after every recovery compare the live weights with
    the float64 merge of the snapshots a person would keep: those of the window taken before
    the loss went bad, none from the abandoned trajectory (whose places new snapshots take
    before the oldest is let go)."""
    from pma_dist.testing import assert_close_rel, merge_reference
    from tests.support.models import full_state

    model = make_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    merger = Merger(model, optimizer, pma)
    guard = SpikeGuard(merger, optimizer, guard_config)
    alive: list[tuple[int, dict]] = []
    method, alpha = guard_config.method, pma.ema_alpha
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.3 if any(step in s for s in spikes) else 3e-3
        loss = loss_of(model, counting_batch(step))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad()
        if merger.step():
            alive = [*alive[-(pma.window - 1) :], (merger.schedule.steps_seen, full_state(model))]
        if guard.observe(loss, grad_norm=norm):
            seen = merger.schedule.steps_seen
            alive = [(s, state) for s, state in alive if s < seen - 1]
            keep = alive[-(guard_config.last_k or len(alive)) :]
            expected = merge_reference([state for _, state in keep], method, alpha)
            assert_close_rel(full_state(model), expected, 1e-6, f"rollback at step {seen}")
            assert guard.recoveries[-1]["snapshot_steps"] == [s for s, _ in keep]
            assert merger.history == [(s, 0) for s, _ in alive]
    for final in ("sma", "wma", "ema"):
        with merger.swapped(final):
            expected = merge_reference([st for _, st in alive], final, alpha)
            assert_close_rel(full_state(model), expected, 1e-6, f"{final} merge after recovery")
    return guard, optimizer


def test_two_spikes_in_one_window_roll_back_to_healthy_snapshots_only() -> None:
    guard, _ = _recorded_run(
        SpikeGuardConfig(last_k=4),
        PMAConfig(window=6, interval_steps=2),
        [range(50, 52), range(58, 60)],
    )
    assert [r["step"] for r in guard.recoveries] == [52, 60], guard.recoveries
    assert all(r["snapshots_dropped"] for r in guard.recoveries), "spiked snapshots were dropped"


def test_grad_norm_spike_with_kept_moments_and_configured_ema_alpha() -> None:
    config = SpikeGuardConfig(factor=1e6, grad_norm_factor=3.0, method="ema", reset_optimizer=False)
    guard, optimizer = _recorded_run(
        config, PMAConfig(window=5, interval_steps=2, ema_alpha=0.6), [range(50, 52)]
    )
    assert len(guard.recoveries) >= 1
    assert any(optimizer.state.values()), "reset_optimizer=False keeps the moments"
