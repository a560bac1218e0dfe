"""SnapshotSchedule: token and step grids, starts, growing batches, bad token counts."""

from __future__ import annotations

import pytest

from pma_dist import PMAConfig
from pma_dist.core import SnapshotSchedule


def _schedule(**values) -> SnapshotSchedule:
    return SnapshotSchedule.from_config(PMAConfig(**values))


def test_growing_batch_keeps_token_spacing() -> None:
    schedule = _schedule(interval_tokens=1000)
    taken, batch = [], 37
    while schedule.tokens_seen < 50_000:
        if schedule.advance(batch):
            taken.append(schedule.tokens_seen)
        batch = min(batch + 7, 900)
    assert len(taken) == schedule.tokens_seen // 1000
    for k, tokens in enumerate(taken, start=1):
        assert k * 1000 <= tokens < k * 1000 + 900, (k, tokens)


def test_step_larger_than_interval_takes_one_snapshot() -> None:
    schedule = _schedule(interval_tokens=100)
    assert schedule.advance(350)
    assert schedule.next_due == 400
    assert not schedule.advance(40) and schedule.advance(10)


def test_step_interval_with_start_step() -> None:
    schedule = _schedule(interval_steps=3, start_step=5)
    due = [step for step in range(1, 21) if schedule.advance()]
    assert due == [8, 11, 14, 17, 20]


def test_start_tokens_and_tokens_per_step() -> None:
    schedule = _schedule(interval_tokens=100, start_tokens=1000, tokens_per_step=50)
    due = [schedule.tokens_seen for _ in range(40) if schedule.advance()]
    assert due == [1100, 1200, 1300, 1400, 1500, 1600, 1700, 1800, 1900, 2000]


def test_step_gate_on_token_grid() -> None:
    schedule = _schedule(interval_tokens=100, start_step=4)
    due = [schedule.steps_seen for _ in range(8) if schedule.advance(100)]
    assert due == [4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "tokens, error", [(-1, ValueError), (1.5, TypeError), ("12", TypeError), (None, ValueError)]
)
def test_bad_token_counts(tokens, error) -> None:
    schedule = _schedule(interval_tokens=100)
    with pytest.raises(error, match="tokens"):
        schedule.advance(tokens)
    assert schedule.steps_seen == 0 and schedule.tokens_seen == 0


def test_state_round_trip_and_interval_change() -> None:
    schedule = _schedule(interval_tokens=100)
    for _ in range(7):
        schedule.advance(30)
    resumed = _schedule(interval_tokens=100)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed == schedule
    changed = _schedule(interval_tokens=50)
    changed.load_state_dict(schedule.state_dict())
    assert (changed.tokens_seen, changed.next_due) == (210, 250)
