"""Compressed windows on real ranks: FSDP2 with uneven shards and NaN on one rank only, saved as
per-rank files and DCP at 4 ranks and resumed at 2; DDP replicas that encode bit for bit alike;
DeepSpeed ZeRO with MoE, resumed at another world size and ZeRO stage. Every merge is checked
against the float64 merge of the gathered snapshots within the codes' bound (pma_dist.testing,
from the codes' definitions), every resume bitwise where the layout keeps the stored bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import (
    assert_bitwise_equal,
    assert_compressed_merge,
    reference_weights,
    run_ranks,
)
from tests.support.models import full_state, make_model, shard_fsdp2, train_step

CODES = ("bf16", "fp8")
WINDOW, POISONED = 4, 3
"""The third snapshot holds NaN/Inf on rank 1 only: the ranks agree to leave it out."""
CHECKS = {
    "sma": None,
    "wma": None,
    "ema": None,
    "cosine": None,
    "last2_stride2": {"last": 2, "stride": 2},
}


def _chain_weights(method: str, valid: list[int], chain_length: int) -> list[float]:
    """One weight per chain snapshot for a merge over the valid positions ``valid``."""
    out = [0.0] * chain_length
    if method == "last2_stride2":
        out[valid[-1]], out[valid[-3]] = 0.5, 0.5
        return out
    for position, weight in zip(valid, reference_weights(method, len(valid))):
        out[position] = weight
    return out


def _merges(mergers, model) -> dict:
    out = {}
    for code, merger in mergers.items():
        for name, options in CHECKS.items():
            method = name if options is None else "sma"
            with merger.swapped(method, **(options or {})):
                out[code, name] = full_state(model)
    return out


def _fsdp2_worker(rank: int, world_size: int, root: str, phase: str) -> dict:
    torch.manual_seed(0)
    model = shard_fsdp2(make_model(seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    config = {"window": WINDOW, "interval_steps": 1, "max_consecutive_skips": None}
    mergers = {c: Merger(model, optimizer, PMAConfig(compression=c, **config)) for c in CODES}
    out: dict = {"snapshots": [], "flags": []}
    if phase == "resume":
        for code, merger in mergers.items():
            merger.load(Path(root) / code)
        dcp_mergers = {c: Merger(model, None, PMAConfig(compression=c, **config)) for c in CODES}
        dcp.load({"model": model.state_dict(), **dcp_mergers}, checkpoint_id=f"{root}/dcp")
        out["files"] = _merges(mergers, model)
        out["dcp"] = _merges(dcp_mergers, model)
        out["history"] = {c: list(m.history) for c, m in mergers.items()}
        out["skipped"] = {c: m.num_skipped for c, m in dcp_mergers.items()}
        for merger in mergers.values():
            merger.check_replicas()
    steps = range(7) if phase == "train" else range(7, 10)
    for step in steps:
        train_step(model, optimizer, step, rank, world_size)
        poison = phase == "train" and step == POISONED - 1 and rank == 1
        if poison:
            backup = [p.to_local().clone() for p in model.parameters()]
            with torch.no_grad():
                local = next(model.parameters()).to_local().view(-1)
                local[0], local[-1] = float("nan"), float("inf")
        for merger in mergers.values():
            merger.step()
        out["snapshots"].append(full_state(model))
        if poison:
            with torch.no_grad():
                for p, saved in zip(model.parameters(), backup):
                    p.to_local().copy_(saved)
        if step == 4:
            out["mid"] = _merges(mergers, model)
            out["mid_skipped"] = {c: m.num_skipped for c, m in mergers.items()}
            out["mid_history"] = {c: list(m.history) for c, m in mergers.items()}
    out["end"] = _merges(mergers, model)
    if phase == "train":
        for code, merger in mergers.items():
            merger.save(Path(root) / code)
        dcp.save({"model": model.state_dict(), **mergers}, checkpoint_id=f"{root}/dcp")
    return out if rank == 0 else {}


def _effective(snapshots: list[dict]) -> list[dict]:
    """What a compressed chain stores of each snapshot: a NaN/Inf element as no change."""
    out, previous = [], None
    for snapshot in snapshots:
        previous = {
            n: torch.where(t.isfinite(), t, previous[n] if previous else torch.zeros_like(t))
            for n, t in snapshot.items()
        }
        out.append(previous)
    return out


def _check(merges: dict, chain: list[dict], valid: list[int], what: str, roundings=1) -> None:
    for (code, name), merged in merges.items():
        weights = _chain_weights(name, valid, len(chain))
        assert_compressed_merge(merged, chain, weights, code, f"{what} {code} {name}", roundings)


def test_fsdp2_windows_skip_agreed_nan_and_resume_at_another_world_size(tmp_path: Path) -> None:
    root = str(tmp_path)
    trained = run_ranks(_fsdp2_worker, 4, root, "train")[0]
    chain = _effective(trained["snapshots"])
    assert not all(t.isfinite().all() for t in trained["snapshots"][POISONED - 1].values())
    assert trained["mid_skipped"] == {"bf16": 1, "fp8": 1}, "every rank left it out"
    assert trained["mid_history"]["bf16"] == [(2, 0), (4, 0), (5, 0)], "weight 0 until it leaves"
    _check(trained["mid"], chain[:5], [1, 3, 4], "after the poisoned snapshot")
    _check(trained["end"], chain, [3, 4, 5, 6], "at the end")

    resumed = run_ranks(_fsdp2_worker, 2, root, "resume")[0]
    assert resumed["history"] == {c: [(4, 0), (5, 0), (6, 0), (7, 0)] for c in CODES}
    assert resumed["skipped"] == {"bf16": 1, "fp8": 1}
    for form in ("files", "dcp"):
        for key, merged in trained["end"].items():
            assert_bitwise_equal(resumed[form][key], merged, f"{form} at 2 ranks: {key}")
    continued = chain + _effective(resumed["snapshots"])
    _check(resumed["end"], continued, [6, 7, 8, 9], "continued at 2 ranks")


def _ddp_worker(rank: int, world_size: int) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(make_model(seed=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    out = {}
    for code in CODES:
        merger = Merger(model, optimizer, PMAConfig(window=3, interval_steps=1, compression=code))
        for step in range(5):
            train_step(model, optimizer, step, rank, world_size)
            merger.step()
        merger.check_replicas()
        plane = merger._state.stored()[-1][1][0]
        if rank == 1:
            plane.view(-1)[0] += 1
        try:
            merger.check_replicas()
            out[code] = "passed"
        except PMAStateError as err:
            out[code] = str(err)
    return out


def test_ddp_replicas_encode_bit_for_bit_alike() -> None:
    for result in run_ranks(_ddp_worker, 2):
        for code in CODES:
            assert "replicas differ" in result[code], (code, result[code])


def _deepspeed_worker(rank: int, world_size: int, root: str, code: str, phase: str) -> dict:
    from tests.support.deepspeed_runs import engine_step, full_fp32, make_engine

    stage = {"save": 2, "zero1": 1, "zero3": 3, "train3": 3}[phase]
    pma = {"window": 3, "interval_steps": 1, "compression": code, "method": "wma"}
    engine = make_engine(stage, world_size, pma, seed=0 if phase == "save" else 7)
    out: dict = {"snapshots": []}
    if phase in ("save", "train3"):
        for step in range(6):  # the chain wraps: its planes out of order (0, 2, 1)
            engine_step(engine, step, rank, world_size)
            out["snapshots"].append(full_fp32(engine))
        if phase == "save":
            engine.save_checkpoint(root, tag="t")
    else:
        engine.pma.load(Path(root) / "t")
        records = [None] * world_size
        torch.distributed.all_gather_object(records, engine.pma._state.records)
        out["records"] = records
    with engine.pma.swapped():
        out["merged"] = full_fp32(engine)
    out["history"] = engine.pma.history
    return out if rank == 0 else {}


def _moe_worker(rank: int, world_size: int, code: str) -> dict:
    from tests.support.deepspeed_runs import moe_run

    pma = {"window": 3, "interval_steps": 1, "compression": code, "method": "sma"}
    return moe_run(rank, world_size, pma)


@pytest.mark.parametrize("code", CODES)
def test_deepspeed_windows_resume_at_another_stage_and_world_size(tmp_path: Path, code) -> None:
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = str(tmp_path / "ckpt")
    saved = run_ranks(_deepspeed_worker, 2, root, code, "save")[0]
    wma = [0.0, 0.0, 0.0, *reference_weights("wma", 3)]
    assert_compressed_merge(saved["merged"], saved["snapshots"], wma, code, "ZeRO-2")
    for world_size, phase in ((2, "zero3"), (4, "zero1")):
        loaded = run_ranks(_deepspeed_worker, world_size, root, code, phase)[0]
        assert loaded["history"] == saved["history"]
        assert all(r == loaded["records"][0] for r in loaded["records"]), loaded["records"]
        if code == "bf16":
            assert_bitwise_equal(loaded["merged"], saved["merged"], f"{phase}: element by element")
        else:
            what = f"{phase}: blocks cut elsewhere, encoded again"
            assert_compressed_merge(loaded["merged"], saved["snapshots"], wma, code, what, 2)
    trained = run_ranks(_deepspeed_worker, 2, root, code, "train3")[0]
    what = "ZeRO-3: padded partitions encoded run by run"
    assert_compressed_merge(trained["merged"], trained["snapshots"], wma, code, what)
    moe = run_ranks(_moe_worker, 2, code)[0]
    sma = [0.0, *reference_weights("sma", 3)]
    assert_compressed_merge(moe["merged"], moe["snapshots"], sma, code, "MoE, expert parallel")
