"""Training-step time of the reference program with PMA on against off, FSDP2, in one run.

    python benchmarks/training_overhead.py [--nproc 2] [--blocks 4]

The demo model (configs/demo_dense.yaml) with PMA at the paper's cadence scaled down (a
snapshot every 100 steps, window 10). "On" and "off" alternate in blocks of 100 steps on the
same model; "off" skips ``merger.step``. Also timed directly: one snapshot, whose cost spread
over the 100 steps between snapshots is the overhead a quiet machine would show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_figures, torchrun_json  # noqa: E402


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from pretrain.config import RunConfig
    from pretrain.data import TrainBatches, load_corpus
    from pretrain.trainer import Trainer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = RunConfig.from_yaml(ROOT / "configs" / "demo_dense.yaml")
    cfg.pma = {"method": "wma", "window": 10, "interval_steps": 100}
    train, _ = load_corpus(None, 4_000_000)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = TrainBatches(train, cfg.data.seq_len, cfg.data.batch_per_rank, rank, world, 0)
    trainer = Trainer(cfg, device, 384, None)
    step = trainer.merger.step
    times = {"on": [], "off": []}
    index = 0
    for _ in range(5):
        trainer.step(batches.at(index))
        index += 1
    for block in range(args.blocks):
        for name in ("on", "off") if block % 2 == 0 else ("off", "on"):
            trainer.merger.step = step if name == "on" else (lambda tokens=None: False)
            _sync(device)
            start = time.perf_counter()
            for _ in range(100):
                trainer.step(batches.at(index))
                index += 1
            _sync(device)
            times[name].append(time.perf_counter() - start)
    trainer.merger.step = step
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        trainer.merger.snapshot()
    _sync(device)
    snapshot = (time.perf_counter() - start) / 5
    if rank == 0:
        off, on = (1000 * statistics.median(times[k]) / 100 for k in ("off", "on"))
        row = {
            "world_size": world,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "step_ms_off": off,
            "step_ms_on": on,
            "measured_overhead": on / off - 1,
            "snapshot_ms": 1000 * snapshot,
            "snapshot_share_of_100_steps": 1000 * snapshot / (100 * off),
            "snapshots_taken": trainer.merger.num_snapshots - 5,
        }
        print(json.dumps(row))
    dist.destroy_process_group()


def _sync(device) -> None:
    from common import synchronize

    synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=2, help="blocks of 100 steps per setting")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    r = torchrun_json(__file__, args.nproc, [f"--blocks={args.blocks}"], cwd=str(ROOT))
    print(
        "| ranks | step ms off | step ms on | measured overhead | snapshot ms "
        "| snapshot / 100 steps |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {r['world_size']} | {r['step_ms_off']:.1f} | {r['step_ms_on']:.1f} "
        f"| {r['measured_overhead']:+.2%} | {r['snapshot_ms']:.2f} "
        f"| {r['snapshot_share_of_100_steps']:.3%} |"
    )
    save_figures(args.out, r)


if __name__ == "__main__":
    main()
