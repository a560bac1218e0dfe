"""Whole-tensor replicas (DDP) and the rank-agreed non-finite skip, on 2 real ranks."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pma_dist import Merger, NonFiniteSnapshotError, PMAConfig, PMAStateError
from pma_dist.merger import RUNNING_VERDICTS_HELD
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, run_ranks, window_reference
from tests.support.models import batch, full_state, make_model, shard_fsdp2, train_step
from tests.support.probes import accelerator_fold, counted_calls, judged_snapshot

BAD_RANK = 1


def _local_slots(merger: Merger) -> list[torch.Tensor]:
    slots = merger.state_dict()["slots"].values()
    return [t.to_local().clone() for slot in slots for t in slot.values()]


def _poison(model: torch.nn.Module, value: float) -> tuple[torch.Tensor, float, str]:
    """Write ``value`` into one element of the first non-empty local shard; return how to undo
    and the parameter's name."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local().view(-1)
            if local.numel():
                index = local.numel() // 2
                old = local[index].item()
                local[index] = value
                return local[index : index + 1], old, name
    raise AssertionError("no local shard on this rank")


def _worker(rank: int, world_size: int) -> dict:
    out: dict = {"taken": [], "strict": []}
    ddp = DDP(make_model(seed=1))
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    merger = Merger(ddp, optimizer, PMAConfig(method="wma", window=3, interval_steps=1))
    snapshots = []
    for step in range(5):
        train_step(ddp, optimizer, step, rank, world_size)
        assert merger.step()
        snapshots.append(full_state(ddp))
    out["ddp_names"] = merger.names
    with merger.swapped():
        out["ddp_merged"] = full_state(ddp)
    out["ddp_snapshots"] = snapshots
    merger.check_replicas()
    if rank == BAD_RANK:
        with torch.no_grad():
            merger._state.slots[0][0].view(-1)[0] += 1e-3
    try:
        merger.check_replicas()
        out["diverged"] = "not detected"
    except PMAStateError as err:
        out["diverged"] = str(err)

    fsdp = shard_fsdp2(make_model(seed=2), world_size)
    fsdp_opt = torch.optim.SGD(fsdp.parameters(), lr=0.1)
    with torch.no_grad():
        fsdp(batch(0, rank, world_size)[:, :-1])  # leaves the root unsharded (FSDP2 default)
    skip = Merger(fsdp, fsdp_opt, PMAConfig(window=2, interval_steps=1, max_consecutive_skips=None))
    strict = Merger(fsdp, fsdp_opt, PMAConfig(window=None, interval_steps=1, on_nonfinite="raise"))
    streak = Merger(fsdp, fsdp_opt, PMAConfig(window=2, interval_steps=1, max_consecutive_skips=2))
    running = Merger(
        fsdp, fsdp_opt, PMAConfig(window=None, interval_steps=1, max_consecutive_skips=None)
    )
    for step in range(3):
        train_step(fsdp, fsdp_opt, step, rank, world_size)
        assert skip.step() and strict.step() and streak.step() and running.snapshot()
    last_good = [p.to_local().detach().clone() for p in fsdp.parameters()]
    before = {"strict": _local_slots(strict), "running": _local_slots(running)}
    for value in (float("nan"), float("inf"), float("-inf")):
        undo = _poison(fsdp, value) if rank == BAD_RANK else None
        if undo is not None:
            out["poisoned"] = undo[2]
        out["taken"].append(judged_snapshot(skip))
        try:
            out.setdefault("streak", []).append(judged_snapshot(streak))
        except NonFiniteSnapshotError as err:
            out["streak"].append(str(err))
        try:
            with accelerator_fold():
                out["strict"].append(judged_snapshot(strict))
        except NonFiniteSnapshotError as err:
            out["strict"].append(str(err))
        out.setdefault("running", []).append(judged_snapshot(running))
        if undo is not None:
            with torch.no_grad():
                undo[0].fill_(undo[1])
    out["counts"] = (
        skip.num_snapshots, skip.num_skipped, strict.num_snapshots, running.num_snapshots,
        running.num_skipped,
    )  # fmt: skip
    out["slots_unchanged"] = {
        name: all(torch.equal(a, b) for a, b in zip(_local_slots(merger), before[name]))
        for name, merger in (("strict", strict), ("running", running))
    }
    # Window mode wrote the bad snapshots over the oldest good one and left them out: the merge
    # is the one good snapshot left, until the next snapshots refill the window.
    out["window_after"] = (skip.window_size, skip.history)
    merged = skip.merged_shards(method="sma")
    out["merge_is_last_good"] = len(merged) == len(last_good) and all(
        torch.equal(merged[name], good) for name, good in zip(skip.names, last_good)
    )
    out["accepted_after"] = (
        judged_snapshot(skip),
        judged_snapshot(strict),
        judged_snapshot(streak),
        judged_snapshot(running),
    )
    out["streak_after"] = streak.skip_streak
    out["costs"] = _snapshot_costs(fsdp, fsdp_opt)
    return out


def _snapshot_costs(model, optimizer) -> dict[str, dict]:
    """Collectives and host syncs made by window snapshots, the agreement and merges; by
    running snapshots on the accelerator's path, and their agreement."""
    merger = Merger(model, optimizer, PMAConfig(window=3, interval_steps=1))
    costs = {}
    running = Merger(model, optimizer, PMAConfig(window=None, interval_steps=1))
    with accelerator_fold():
        with counted_calls() as costs["running snapshots"]:
            for _ in range(RUNNING_VERDICTS_HELD - 1):
                running.snapshot()
        with counted_calls() as costs["running snapshot, agreed"]:
            running.snapshot()
    with counted_calls() as costs["two snapshots"]:
        merger.snapshot()
        merger.snapshot()
    with counted_calls() as costs["third snapshot"]:
        merger.snapshot()
    with counted_calls() as costs["merge, none pending"]:
        merger.merged_shards()
    merger.snapshot()
    with counted_calls() as costs["merge, one pending"]:
        merger.merged_shards()
    return {k: dict(v) for k, v in costs.items()}


def test_ddp_parity_and_rank_agreed_nonfinite_skip() -> None:
    r0, r1 = run_ranks(_worker, 2)
    assert "embed.weight" in r0["ddp_names"], r0["ddp_names"]
    assert not any(n.startswith("module.") for n in r0["ddp_names"]), "DDP prefix leaked"
    assert_bitwise_equal(r0["ddp_merged"], r1["ddp_merged"], "DDP replicas")
    expected = window_reference(r0["ddp_snapshots"], 3, "wma")
    assert_close_rel(r0["ddp_merged"], expected, 1e-6, "DDP wma")
    for r in (r0, r1):
        assert "replicas differ: ranks 0 and 1" in r["diverged"]
        assert r["taken"] == [False, False, False]
        assert r["running"] == [False, False, False]
        assert r["counts"] == (3, 3, 3, 3, 3)
        assert r["slots_unchanged"] == {"strict": True, "running": True}, "nothing NaN folded"
        assert r["window_after"] == (1, [(3, 0)]), r["window_after"]
        assert r["merge_is_last_good"]
        assert r["accepted_after"] == (True, True, True, True)
        assert len(r["strict"]) == 3 and all("NaN/Inf" in s for s in r["strict"]), r["strict"]
        named = f"NaN/Inf in the live weights now: rank {BAD_RANK}: {r1['poisoned']}"
        assert all(named in s for s in r["strict"]), r["strict"]
        assert r["streak"][0] is False, "the first non-finite snapshot is skipped"
        for message in r["streak"][1:]:
            assert "2 snapshots in a row" in message and "max_consecutive_skips = 2" in message
            assert f"rank {BAD_RANK}: {r1['poisoned']}" in message, message
            assert "rank 0:" not in message, "the clean rank is not named"
        assert r["streak_after"] == 0, "a good snapshot resets the streak"
        costs = r["costs"]
        assert costs["two snapshots"] == {}, "no collective, no host sync in a window snapshot"
        agreement = {"all_reduce": 1, "tolist": 1}
        assert costs["third snapshot"] == agreement, "a window of verdicts is agreed at once"
        assert costs["merge, none pending"] == {}
        assert costs["merge, one pending"] == agreement
        held = RUNNING_VERDICTS_HELD - 1
        assert costs["running snapshots"] == {"all_reduce": held}, "one all-reduce, no sync"
        assert costs["running snapshot, agreed"] == {"all_reduce": 2, "tolist": 1}
