"""Writes the version-1 state fixtures under tests/data/state_v1 (run once, at commit 5476a02,
the last commit that wrote version 1; kept to show how they were made).

Two FSDP2 ranks train a BufferedLM, a window-3 WMA Merger and a running EMA Merger snapshot
every 2 steps, and after 9 steps the run saves
* ``dcp/``: ``dcp.save({"model": ..., "pma": window, "pma_running": running})``;
* ``files/``: ``window.save(...)`` (one ``pma_rank*.pt`` per rank);
* ``reference.safetensors``: the full parameters at every snapshot (``snapshot{k}.{name}``)
  and the live parameters and buffers at the save (``live.{name}``), for float64 references.

    python -m tests.data.make_state_v1
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

HERE = Path(__file__).parent / "state_v1"
STEPS, INTERVAL = 9, 2


def _worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from pma_dist import Merger, PMAConfig
    from tests.support.models import full_state, make_buffered_model, shard_fsdp2, train_step

    model = shard_fsdp2(make_buffered_model(seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    window = Merger(model, optimizer, PMAConfig(method="wma", window=3, interval_steps=INTERVAL))
    running = Merger(
        model, optimizer, PMAConfig(method="ema", window=None, interval_steps=INTERVAL)
    )
    snapshots = {}
    for step in range(STEPS):
        train_step(model, optimizer, step, rank, world_size)
        model.update_buffers(step)
        taken = window.step()
        running.step()
        if taken:
            for name, value in full_state(model).items():
                snapshots[f"snapshot{window.num_snapshots - 1}.{name}"] = value
    state = {"model": get_model_state_dict(model), "pma": window, "pma_running": running}
    dcp.save(state, checkpoint_id=str(Path(root) / "dcp"))
    window.save(Path(root) / "files")
    live = {f"live.{n}": v for n, v in full_state(model).items()}
    live.update({f"live.{n}": b.detach().clone() for n, b in model.named_buffers()})
    return {**snapshots, **live} if rank == 0 else {}


def main() -> None:
    from safetensors.torch import save_file

    from pma_dist.testing import run_ranks

    if HERE.exists():
        shutil.rmtree(HERE)
    HERE.mkdir(parents=True)
    tensors = run_ranks(_worker, 2, str(HERE))[0]
    save_file({k: v.contiguous() for k, v in tensors.items()}, HERE / "reference.safetensors")


if __name__ == "__main__":
    main()
