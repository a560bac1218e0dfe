"""Padding that no one initialized never reaches a result: DeepSpeed ZeRO-3 pads every
parameter's fp32 partition to a multiple of the world size, and with uninitialized memory
filled with NaN (forced here, whatever the suite's switch says) that padding is NaN."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from pma_dist.testing import (  # noqa: E402
    assert_bitwise_equal,
    assert_close_rel,
    fill_uninitialized_memory,
    run_ranks,
    window_reference,
)
from tests.support.deepspeed_runs import ds_config, full_fp32  # noqa: E402

PMA = {"method": "wma", "window": 3, "interval_steps": 1}


class PaddedNet(torch.nn.Module):
    """Every parameter's size is odd: 13 x 37, 37, 37 x 5, 5 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(13, 37)
        self.down = torch.nn.Linear(37, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _engine(seed: int, world_size: int):
    from pma_dist.deepspeed import initialize

    torch.manual_seed(seed)
    model = PaddedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = initialize(model=model, optimizer=optimizer, config=ds_config(3, world_size, PMA))
    return engine


def _step(engine, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 13, generator=g), torch.randn(4, 5, generator=g)
    engine.backward(torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
    engine.step()


def _padding_is_nan(engine) -> bool:
    """True when some element of a live fp32 partition outside every fragment is NaN."""
    for shard in engine.pma.backend.shards():
        covered = torch.zeros(shard.local.numel(), dtype=torch.bool)
        for f in shard.fragments:
            covered[f.local_start : f.local_start + f.numel] = True
        if bool(shard.local.view(-1)[~covered].isnan().any()):
            return True
    return False


def _worker(rank: int, world_size: int, root: str) -> dict:
    from pma_dist import _comm as comm

    fill_uninitialized_memory()
    engine = _engine(0, world_size)
    snapshots = []
    for step in range(4):
        _step(engine, step, rank)
        snapshots.append(full_fp32(engine))
    nan_padding = comm.gather_objects(_padding_is_nan(engine))
    counts = (engine.pma.num_snapshots, engine.pma.num_skipped)
    with engine.pma.swapped():
        merged = full_fp32(engine)
    engine.pma.check_replicas()
    engine.save_checkpoint(root)
    resumed = _engine(1, world_size)
    resumed.load_checkpoint(root)
    with resumed.pma.swapped():
        merged_after_load = full_fp32(resumed)
    resumed.pma.check_replicas()
    out = {"counts": counts, "nan_padding": nan_padding, "snapshots": snapshots}
    return {**out, "merged": merged, "merged_after_load": merged_after_load}


def test_zero3_padding_filled_with_nan_changes_nothing(tmp_path: Path) -> None:
    result = run_ranks(_worker, 2, str(tmp_path))[0]
    assert any(result["nan_padding"]), "the case under test: NaN padding in the live partition"
    assert result["counts"] == (4, 0), "no snapshot skipped for padding"
    expected = window_reference(result["snapshots"], 3, "wma")
    assert_close_rel(result["merged"], expected, 1e-6, "merge of the real elements")
    assert_bitwise_equal(result["merged_after_load"], result["merged"], "saved and loaded")
    from safetensors.torch import load_file

    files = sorted((tmp_path / "global_step4").glob("pma_*_rank*.safetensors"))
    assert len(files) == 2
    for path in files:
        for name, tensor in load_file(path).items():
            assert bool(torch.isfinite(tensor).all()), f"{path.name} {name}: padding was saved"
