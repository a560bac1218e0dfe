"""FSDP2 at 1, 2 and 4 ranks: merged weights equal a float64 reference from gathered snapshots."""

from __future__ import annotations

import pytest
import torch

from pma_dist import Merger, PMAConfig
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_close_rel,
    merge_reference,
    run_ranks,
    window_reference,
)
from tests.support.models import batch, full_state, make_model, shard_fsdp2, train_step

WINDOW, ALPHA, SNAPSHOTS = 8, 0.3, 33
CHECK_AT = {1, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW, SNAPSHOTS}
USER_WEIGHTS = [3.0, 1.0, 0.0, 2.0, 5.0, 1.0, 1.0, 4.0]


def _parity_worker(rank: int, world_size: int) -> dict:
    model = shard_fsdp2(make_model(seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    window = Merger(model, optimizer, PMAConfig(window=WINDOW, interval_steps=2, ema_alpha=ALPHA))
    running = {
        m: Merger(
            model, optimizer, PMAConfig(method=m, window=None, interval_steps=2, ema_alpha=ALPHA)
        )
        for m in ("sma", "wma", "ema")
    }
    snapshots, merges, swaps = [], {}, {}
    step = 0
    while window.num_snapshots < SNAPSHOTS:
        train_step(model, optimizer, step, rank, world_size)
        step += 1
        taken = [window.step()] + [r.step() for r in running.values()]
        assert len(set(taken)) == 1, taken
        if not taken[0]:
            continue
        snapshots.append(full_state(model))
        k = window.num_snapshots
        if k not in CHECK_AT:
            continue
        for method in ("sma", "wma", "ema"):
            with window.swapped(method):
                merges[("window", method, k)] = full_state(model)
            with running[method].swapped():
                merges[("running", method, k)] = full_state(model)
        if k >= WINDOW:
            with window.swapped(weights=USER_WEIGHTS):
                merges[("window", "user", k)] = full_state(model)
    probe = batch(999, 0, 1)[:2, :-1]
    with torch.no_grad():
        swaps["logits_before"] = model(probe)
        with window.swapped("ema"):
            swaps["logits_inside"] = model(probe)
            swaps["merged_for_logits"] = full_state(model)
        swaps["logits_after"] = model(probe)
    swaps["probe"] = probe
    swaps["before"] = full_state(model)
    try:
        with window.swapped("wma"):
            swaps["inside"] = full_state(model)
            raise KeyError("raised inside the swap")
    except KeyError:
        pass
    swaps["after_raise"] = full_state(model)
    window.apply("sma")
    swaps["applied"] = full_state(model)
    swaps["loss_after_apply"] = train_step(model, optimizer, step, rank, world_size)
    swaps["trained_after_apply"] = full_state(model)
    return {"snapshots": snapshots, "merges": merges, "swaps": swaps} if rank == 0 else {}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fsdp2_merges_match_float64_reference(world_size: int) -> None:
    result = run_ranks(_parity_worker, world_size)[0]
    snapshots, merges, swaps = result["snapshots"], result["merges"], result["swaps"]
    assert len(snapshots) == SNAPSHOTS
    assert {k for _, _, k in merges} == CHECK_AT
    for (mode, method, k), merged in merges.items():
        seen = snapshots[:k]
        if mode == "running":
            expected = merge_reference(seen, method, ALPHA)
        elif method == "user":
            expected = window_reference(seen, WINDOW, "sma", weights=USER_WEIGHTS)
        else:
            expected = window_reference(seen, WINDOW, method, ALPHA)
        assert_close_rel(merged, expected, 1e-6, f"{mode} {method} after {k} snapshots")

    plain = make_model(seed=0)
    plain.load_state_dict(swaps["merged_for_logits"])
    with torch.no_grad():
        expected_logits = plain(swaps["probe"])
    assert_close_rel(
        {"logits": swaps["logits_inside"]}, {"logits": expected_logits}, 1e-5, "forward"
    )
    assert_bitwise_equal(
        {"l": swaps["logits_after"]}, {"l": swaps["logits_before"]}, "forward after"
    )
    assert_bitwise_equal(swaps["after_raise"], swaps["before"], "restore after a raising body")
    assert_close_rel(swaps["inside"], window_reference(snapshots, WINDOW, "wma"), 1e-6, "swap")
    assert_close_rel(swaps["applied"], window_reference(snapshots, WINDOW, "sma"), 1e-6, "apply")
    assert torch.isfinite(torch.tensor(swaps["loss_after_apply"]))
    moved = [
        n
        for n in swaps["applied"]
        if not torch.equal(swaps["applied"][n], swaps["trained_after_apply"][n])
    ]
    assert moved, "training did not move the parameters after apply()"
