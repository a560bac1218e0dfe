"""Faults: a rank killed mid-snapshot or mid-checkpoint makes the others fail within the
collective timeout, the previous checkpoint stays loadable, and resuming from it gives the
averages of an uninterrupted run. Truncated or corrupted state files are refused."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import assert_bitwise_equal, run_rank_outcomes, run_ranks
from tests.support.models import make_model, shard_fsdp2, train_step

END, GOOD = 12, 6


def _gathered(merger: Merger) -> dict[str, torch.Tensor]:
    return {
        f"{k}.{n}": t.full_tensor().clone()
        for k, slot in merger.state_dict()["slots"].items()
        for n, t in slot.items()
    }


def _worker(rank: int, world_size: int, root: str, fault: str | None, resume: bool) -> dict:
    model = shard_fsdp2(make_model(seed=0), world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    merger = Merger(model, optimizer, PMAConfig(method="ema", window=3, interval_steps=2))

    def state(step: int) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd, "pma": merger, "trainer": {"step": step}}

    step = 0
    if resume:
        loaded = state(0)
        dcp.load(loaded, checkpoint_id=str(Path(root) / f"step{GOOD}"))
        set_state_dict(
            model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
        step = loaded["trainer"]["step"]
    if fault and rank == 1:
        _arm(fault)
    started = time.monotonic()
    try:
        while step < END:
            train_step(model, optimizer, step, rank, world_size)
            step += 1
            merger.step()
            if step in (GOOD, 10) and not resume:
                dcp.save(state(step), checkpoint_id=str(Path(root) / f"step{step}"))
    except Exception as err:  # noqa: BLE001 - survivors report what stopped them
        return {"failed_after": time.monotonic() - started, "error": type(err).__name__}
    return {"state": _gathered(merger), "count": merger.num_snapshots}


def _arm(fault: str) -> None:
    """Make this rank die by SIGKILL in the middle of the next snapshot or checkpoint."""
    from pma_dist import Merger
    from pma_dist.core import WindowAverage

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if fault == "snapshot":
        original = WindowAverage.snapshot

        def snapshot(self, *args, **kwargs):
            if self.count >= 4:
                die()
            return original(self, *args, **kwargs)

        WindowAverage.snapshot = snapshot
    else:
        original = Merger.state_dict

        def state_dict(self):
            if self.num_snapshots >= 5:
                die()
            return original(self)

        Merger.state_dict = state_dict


@pytest.mark.parametrize("fault", ["snapshot", "checkpoint"])
def test_killed_rank_then_resume_from_last_good_checkpoint(tmp_path: Path, fault: str) -> None:
    root = str(tmp_path)
    reference = run_ranks(_worker, 2, str(tmp_path / "reference"), None, False)[0]
    outcomes = run_rank_outcomes(
        _worker, 2, root, fault, False, collective_timeout=30, stop_on_failure=False, timeout=240
    )
    assert outcomes[1].exitcode == -signal.SIGKILL
    survivor = outcomes[0].result
    assert survivor is not None and survivor["failed_after"] < 60, outcomes[0]
    if fault == "checkpoint":
        assert not (tmp_path / "step10" / ".metadata").exists(), "a torn checkpoint looks whole"
    resumed = run_ranks(_worker, 2, root, None, True)[0]
    assert resumed["count"] == reference["count"]
    assert_bitwise_equal(resumed["state"], reference["state"], f"resume after a kill mid-{fault}")


def _saved(tmp_path: Path) -> tuple[Merger, Path]:
    model = make_model()
    merger = Merger(model, None, PMAConfig(window=2, interval_steps=1))
    for _ in range(3):
        with torch.no_grad():
            model.head.weight.mul_(1.01)
        merger.step()
    return merger, merger.save(tmp_path / "state")


def _tensor_byte(path: Path) -> int:
    """Offset of a byte in the middle of a safetensors file's tensor data."""
    raw = path.read_bytes()
    base = 8 + int.from_bytes(raw[:8], "little")
    return base + (len(raw) - base) // 2


def test_truncated_corrupted_or_incomplete_state_files_are_refused(tmp_path: Path) -> None:
    merger, directory = _saved(tmp_path)
    target = Merger(make_model(seed=4), None, PMAConfig(window=2, interval_steps=1))
    target.load(directory)
    assert target.num_snapshots == 3
    (file,) = directory.glob("pma_*_rank00000.safetensors")
    good = file.read_bytes()

    data = bytearray(good)
    data[_tensor_byte(file)] ^= 0x10
    file.write_bytes(bytes(data))
    fresh = Merger(make_model(seed=4), None, PMAConfig(window=2, interval_steps=1))
    with pytest.raises(PMAStateError, match="do not match their checksum"):
        fresh.load(directory)
    file.write_bytes(good[: len(good) // 2])
    with pytest.raises(PMAStateError, match="truncated"):
        fresh.load(directory)
    file.unlink()
    with pytest.raises(PMAStateError, match="missing"):
        fresh.load(directory)
    file.write_bytes(good)
    (directory / "pma_index.json").rename(directory / "elsewhere.json")
    with pytest.raises(PMAStateError, match="no PMA state saved here"):
        fresh.load(directory)
    (directory / "elsewhere.json").rename(directory / "pma_index.json")
    other = merger.save(tmp_path / "other")
    (foreign,) = other.glob("pma_*_rank00000.safetensors")
    file.write_bytes(foreign.read_bytes())
    with pytest.raises(PMAStateError, match="a save was interrupted, or files were mixed"):
        fresh.load(directory)
    assert fresh.num_snapshots == 0, "nothing was loaded"


def test_a_save_interrupted_before_its_index_leaves_the_previous_one(
    tmp_path: Path, monkeypatch
) -> None:
    from pma_dist.state import _indexed as indexed_state

    merger, directory = _saved(tmp_path)
    before = merger.merged_shards()
    with torch.no_grad():
        merger._model.head.weight.mul_(1.5)
    merger.step()

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(indexed_state, "replace_durably", crash)
    with pytest.raises(OSError, match="disk full"):
        merger.save(directory)
    monkeypatch.undo()
    assert len(list(directory.glob("pma_*_rank00000.safetensors"))) == 2, "both saves' files"
    fresh = Merger(make_model(seed=4), None, PMAConfig(window=2, interval_steps=1))
    fresh.load(directory)
    assert_bitwise_equal(fresh.merged_shards(), before, "the previous save, whole")
    merger.save(directory)
    assert len(list(directory.glob("pma_*_rank00000.safetensors"))) == 1, "stale files removed"
