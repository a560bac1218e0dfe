"""The merge monitor: every K snapshots it ranks merges on held-out data, logs them (JSON lines,
TensorBoard), keeps the best merge so far exported, and resumes with the Merger's state.
Losses are checked against float64 merges of the recorded snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pma_dist import MergeMonitor, Merger, MergeSpec, MonitorConfig, PMAConfig
from tests.support.models import make_model

CANDIDATES = [MergeSpec("sma", 2), MergeSpec("wma", 4), MergeSpec("sma", 2, 2), MergeSpec("ema", 4)]
WEIGHTS = {
    "sma": lambda k: [1 / k] * k,
    "wma": lambda k: [i / (k * (k + 1) / 2) for i in range(1, k + 1)],
}


def _ema(k: int, alpha: float = 0.2) -> list[float]:
    return [(1 - alpha) ** (k - 1)] + [alpha * (1 - alpha) ** (k - i) for i in range(2, k + 1)]


class Run:
    """A model walked at random with a drift, a window-4 Merger snapshotting every step, a
    monitor every 2 snapshots whose loss is the float64 squared distance to the point the drift
    passes at step 6 (so merges improve, then fall behind)."""

    def __init__(self, root: Path, **monitor: object) -> None:
        torch.manual_seed(0)
        self.model = make_model()
        self.merger = Merger(self.model, None, PMAConfig(window=4, interval_steps=1))
        self.drift = {n: torch.full_like(p, 0.01) for n, p in self.model.named_parameters()}
        self.target = {
            n: p.detach().double() + 6 * self.drift[n].double()
            for n, p in self.model.named_parameters()
        }
        config = dict(every=2, candidates=CANDIDATES, log_dir=str(root / "logs"))
        self.monitor = MergeMonitor(self.merger, self.evaluate, {**config, **monitor})
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.generator = torch.Generator().manual_seed(1)

    def distance(self, state) -> float:
        return float(sum(((state[n].double() - t) ** 2).sum() for n, t in self.target.items()))

    def evaluate(self) -> float:
        return self.distance({n: p.detach() for n, p in self.model.named_parameters()})

    def train(self, steps: int) -> None:
        for _ in range(steps):
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    p.add_(torch.randn(p.shape, generator=self.generator) * 0.01 + self.drift[n])
            assert self.merger.step(tokens=100)
            self.snapshots.append(
                {n: p.detach().double().clone() for n, p in self.model.named_parameters()}
            )
            self.monitor.step()

    def reference(self, candidate: MergeSpec, upto: int) -> dict[str, torch.Tensor]:
        held = self.snapshots[max(0, upto - 4) : upto]
        k, s = candidate.last, candidate.stride
        chosen = [held[len(held) - 1 - (k - 1 - i) * s] for i in range(k)]
        weights = _ema(k) if candidate.method == "ema" else WEIGHTS[candidate.method](k)
        return {n: sum(w * c[n] for w, c in zip(weights, chosen)) for n in self.target}

    def records(self) -> list[dict]:
        return [json.loads(line) for line in (self.monitor.log_path).read_text().splitlines()]


def test_monitor_ranks_logs_and_keeps_the_best_export(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(tmp_path, best_dir=str(tmp_path / "best"), tensorboard=True)
    best_files = []
    for _ in range(5):
        run.train(2)
        best_files.append((tmp_path / "best" / "model.safetensors").read_bytes())
    records = run.records()
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert [m["merge"] for m in records[0]["merges"]] == ["sma N=2 stride=1"], "only what fits"
    best_so_far = None
    for record in records:
        upto = record["step"]
        assert record["live_loss"] == pytest.approx(run.distance(run.snapshots[upto - 1]), rel=1e-6)
        for merge in record["merges"]:
            candidate = MergeSpec(merge["method"], merge["last"], merge["stride"])
            expected = run.distance(run.reference(candidate, upto))
            assert merge["loss"] == pytest.approx(expected, rel=1e-5), (upto, merge)
        losses = [m["loss"] for m in record["merges"]]
        assert losses == sorted(losses) and record["best"]["loss"] == losses[0]
        improved = best_so_far is None or record["best"]["loss"] < best_so_far["loss"]
        if improved:
            best_so_far = {**record["best"], "step": upto}
        assert record["exported"] == improved
        assert record["best_so_far"]["loss"] == best_so_far["loss"]
        assert record["best_so_far"]["step"] == best_so_far["step"]
    assert {r["exported"] for r in records[1:]} == {True, False}, "both paths exercised"
    for before, after, record in zip(best_files, best_files[1:], records[1:]):
        assert (before == after) != record["exported"], "replaced only by a better merge"
    best = MergeSpec(best_so_far["method"], best_so_far["last"], best_so_far["stride"])
    exported = load_file(tmp_path / "best" / "model.safetensors")
    for name, expected in run.reference(best, best_so_far["step"]).items():
        torch.testing.assert_close(exported[name].double(), expected, rtol=1e-6, atol=1e-7)
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    live = [(e.step, e.value) for e in events.Scalars("pma/live_loss")]
    assert live == [(r["step"], pytest.approx(r["live_loss"], rel=1e-6)) for r in records]
    assert "pma/merge/wma_N4_stride1" in events.Tags()["scalars"]
    run.monitor.close()


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_monitor_resumes_with_the_merger_state(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    whole = Run(tmp_path / "whole")
    whole.train(10)

    run = Run(tmp_path / "resumed")
    run.train(4)
    run.merger.save(tmp_path / "state")
    dcp.save({"pma": run.merger}, checkpoint_id=str(tmp_path / "dcp"))
    saved_model = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    saved_rng = run.generator.get_state()
    run.train(3)
    assert len(run.records()) == 3, "the abandoned run wrote past the checkpoint"
    run.monitor.close()

    resumed = Run(tmp_path / "resumed")
    resumed.merger.load(tmp_path / "state")
    assert resumed.monitor.evaluations == 2 and len(resumed.records()) == 2, "log cut back"
    with torch.no_grad():
        for n, p in resumed.model.named_parameters():
            p.copy_(saved_model[n])
    resumed.generator.set_state(saved_rng)
    resumed.snapshots = run.snapshots[:4]
    resumed.train(6)
    assert _without_timing(resumed.records()) == _without_timing(whole.records())
    assert resumed.monitor.best == whole.monitor.best

    late = Merger(make_model(), None, PMAConfig(window=4, interval_steps=1))
    late.load(tmp_path / "state")
    monitor = MergeMonitor(late, lambda: 0.0, {"every": 2})
    assert monitor.evaluations == 2, "a state loaded before the monitor is handed to it"
    assert monitor.best == whole.records()[1]["best_so_far"]
    from_dcp = Merger(make_model(), None, PMAConfig(window=4, interval_steps=1))
    monitor = MergeMonitor(from_dcp, lambda: 0.0, {"every": 2})
    dcp.load({"pma": from_dcp}, checkpoint_id=str(tmp_path / "dcp"))
    assert (monitor.evaluations, monitor.best) == (2, whole.records()[1]["best_so_far"])


def test_monitor_config_errors_name_the_key() -> None:
    merger = Merger(make_model(), None, PMAConfig(window=4, interval_steps=1))
    with pytest.raises(ValueError, match=r"every = 0: must be an integer >= 1"):
        MergeMonitor(merger, lambda: 0.0, {"every": 0})
    with pytest.raises(ValueError, match=r"unknown key\(s\) evry"):
        MergeMonitor(merger, lambda: 0.0, {"evry": 2})
    with pytest.raises(ValueError, match=r"candidates: 'sma' is not a MergeSpec"):
        MergeMonitor(merger, lambda: 0.0, {"candidates": ["sma"]})
    MergeMonitor(merger, lambda: 0.0, MonitorConfig(candidates=[{"method": "wma", "last": 2}]))
    with pytest.raises(ValueError, match="already has an extension named 'merge_monitor'"):
        MergeMonitor(merger, lambda: 0.0)


def _monitor_worker(rank: int, world_size: int, root: str) -> dict:
    from tests.support.models import shard_fsdp2

    model = shard_fsdp2(make_model(), world_size)
    merger = Merger(model, None, PMAConfig(window=4, interval_steps=1))
    config = {"every": 2, "log_dir": f"{root}/logs", "best_dir": f"{root}/best"}
    monitor = MergeMonitor(merger, lambda: torch.tensor(float(rank)), config)
    selections = []
    for _ in range(4):
        merger.snapshot()
        selections.append(monitor.step())
    return {"log": str(monitor.log_path), "evaluated": [s is not None for s in selections]}


def test_monitor_on_ranks_writes_once(tmp_path: Path) -> None:
    from pma_dist.testing import run_ranks

    outcomes = run_ranks(_monitor_worker, 2, str(tmp_path))
    assert [o["log"] for o in outcomes] == [str(tmp_path / "logs" / "pma_monitor.jsonl"), "None"]
    assert all(o["evaluated"] == [False, True, False, True] for o in outcomes)
    records = [json.loads(line) for line in (tmp_path / "logs" / "pma_monitor.jsonl").open()]
    assert [r["live_loss"] for r in records] == [0.5, 0.5], "losses averaged over the ranks"
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_monitor_logs_to_the_active_wandb_run(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="pma-test")
    try:
        monitored = Run(tmp_path)
        monitored.train(4)
        records = monitored.records()
        summary = dict(run.summary)
    finally:
        run.finish()
    assert summary["_step"] == len(records) - 1 == 1, "one W&B log per evaluation"
    assert summary["pma/step"] == records[-1]["step"]
    assert summary["pma/live_loss"] == pytest.approx(records[-1]["live_loss"])
    assert summary["pma/best_so_far_loss"] == pytest.approx(records[-1]["best_so_far"]["loss"])
    tag = "pma/merge/" + records[-1]["merges"][0]["merge"].replace("=", "").replace(" ", "_")
    assert summary[tag] == pytest.approx(records[-1]["merges"][0]["loss"])
