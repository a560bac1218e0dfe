"""DCP checkpoints carry the averaging state: bitwise resume, and resharding 2 -> 4 -> 1 ranks."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from pma_dist import Merger, PMAConfig
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, run_ranks
from tests.support.models import full_state, make_model, shard_fsdp2, train_step

END_STEP = 24


def _gathered_state(merger: Merger) -> dict[str, torch.Tensor]:
    out = {}
    for k, slot in merger.state_dict()["slots"].items():
        for name, t in slot.items():
            out[f"slot{k}.{name}"] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
    return out


def _merges(model, mergers: dict[str, Merger]) -> dict[str, torch.Tensor]:
    out = {}
    for key, merger in mergers.items():
        methods = ("sma", "wma", "ema") if key == "window" else (None,)
        for method in methods:
            with merger.swapped(method):
                out.update({f"{key}.{method}.{n}": t for n, t in full_state(model).items()})
    return out


def _resume_worker(
    rank: int, world_size: int, root: str, load_step: int | None, save_step: int | None
) -> dict:
    model = shard_fsdp2(make_model(seed=0), world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mergers = {
        "window": Merger(model, optimizer, PMAConfig(method="ema", window=4, interval_steps=2)),
        "running": Merger(model, optimizer, PMAConfig(method="wma", window=None, interval_steps=3)),
    }
    result: dict = {}

    def app_state(step: int) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "trainer": {"step": step}, **mergers}

    step = 0
    if load_step is not None:
        state = app_state(0)
        dcp.load(state, checkpoint_id=str(Path(root) / f"step{load_step}"))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        step = state["trainer"]["step"]
        assert step == load_step, step
        result["merges_at_load"] = _merges(model, mergers)
        result["counts_at_load"] = {k: m.num_snapshots for k, m in mergers.items()}
    while step < END_STEP:
        train_step(model, optimizer, step, rank, world_size)
        step += 1
        for merger in mergers.values():
            merger.step()
        if step == save_step:
            result["merges_at_save"] = _merges(model, mergers)
            result["counts_at_save"] = {k: m.num_snapshots for k, m in mergers.items()}
            dcp.save(app_state(step), checkpoint_id=str(Path(root) / f"step{step}"))
    result["merges"] = _merges(model, mergers)
    result["state"] = {
        f"{key}.{k}": v for key, m in mergers.items() for k, v in _gathered_state(m).items()
    }
    result["counters"] = {
        k: (m.num_snapshots, m.schedule.steps_seen, m.schedule.next_due, list(m.history))
        for k, m in mergers.items()
    }
    result["params"] = full_state(model)
    return result if rank == 0 else {}


def test_resume_bitwise_and_resharded(tmp_path: Path) -> None:
    root = str(tmp_path)
    uninterrupted = run_ranks(_resume_worker, 2, root, None, 12)[0]
    assert uninterrupted["counts_at_save"] == {"window": 6, "running": 4}

    same = run_ranks(_resume_worker, 2, root, 12, None)[0]
    assert_bitwise_equal(
        same["merges_at_load"], uninterrupted["merges_at_save"], "merges after load"
    )
    for key in ("merges", "state", "params"):
        assert_bitwise_equal(same[key], uninterrupted[key], f"2 -> 2 ranks, {key}")
    assert same["counters"] == uninterrupted["counters"]

    wider = run_ranks(_resume_worker, 4, root, 12, 18)[0]
    assert_bitwise_equal(wider["merges_at_load"], uninterrupted["merges_at_save"], "2 -> 4 at load")
    for key in ("merges", "state", "params"):
        assert_close_rel(wider[key], uninterrupted[key], 1e-6, f"2 -> 4 ranks, {key}")
    assert wider["counters"] == uninterrupted["counters"]

    single = run_ranks(_resume_worker, 1, root, 18, None)[0]
    assert_bitwise_equal(single["merges_at_load"], wider["merges_at_save"], "4 -> 1 at load")
    for key in ("merges", "state"):
        assert_close_rel(single[key], wider[key], 1e-6, f"4 -> 1 ranks, {key}")
    assert single["counters"] == wider["counters"]
