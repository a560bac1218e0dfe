"""Training-step time of the reference program with PMA on against off, FSDP2, in one run.

    python -m benchmarks.training_overhead [--nproc 2] [--steps 400]

The demo model (configs/demo_dense.yaml) with PMA at the paper's cadence scaled down (a
snapshot every 100 steps, window 10). Steps alternate on and off on the same model ("off" skips
``merger.step``, so PMA counts only the "on" steps and snapshots every 100 of them), which
cancels the machine's drift (:func:`benchmarks.common.paired_overhead`). Also timed: every
``merger.step`` call inside training ("time in PMA"; on CPU the snapshot is synchronous, so
this is PMA's share of the training time), and one snapshot directly, spread over 100 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import (
    REPOSITORY,
    paired_overhead,
    record_merger_steps,
    save_figures,
    torchrun_json,
)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from launch.pretrain.config import RunConfig
    from launch.pretrain.data import TrainBatches, load_corpus
    from launch.pretrain.trainer import Trainer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    cfg = RunConfig.from_yaml(REPOSITORY / "configs" / "demo_dense.yaml")
    cfg.pma = {"method": "wma", "window": 10, "interval_steps": 100}
    train, _ = load_corpus(None, 4_000_000)
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = TrainBatches(train, cfg.data.seq_len, cfg.data.batch_per_rank, rank, world, 0)
    trainer = Trainer(cfg, device, 384, None)
    step = trainer.merger.step

    def skip(tokens=None) -> bool:
        return False

    for index in range(5):
        trainer.step(batches.at(index))
    calls = record_merger_steps(trainer.merger)
    timed = trainer.merger.step
    times: dict[str, list[float]] = {"on": [], "off": []}
    for index in range(5, 5 + 2 * args.steps):
        name = "on" if index % 2 else "off"
        trainer.merger.step = timed if name == "on" else skip
        _sync(device)
        start = time.perf_counter()
        trainer.step(batches.at(index))
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
        off, on = (1000 * statistics.mean(times[k]) for k in ("off", "on"))
        row = {
            "world_size": world,
            "params": sum(p.numel() for p in trainer.model.parameters()),
            "step_ms_off": off,
            "step_ms_on": on,
            **paired_overhead(times["off"], times["on"]),
            "time_in_pma": sum(calls) / sum(times["on"]),
            "snapshot_ms": 1000 * snapshot,
            "snapshot_share_of_100_steps": 1000 * snapshot / (100 * off),
            "snapshots_taken": trainer.merger.num_snapshots - 5,
        }
        print(json.dumps(row))
    dist.barrier()  # ranks leave together (docs/semantics.md, "Exit")
    dist.destroy_process_group()


def _sync(device) -> None:
    from benchmarks.common import synchronize

    synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per setting")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    r = torchrun_json("benchmarks.training_overhead", args.nproc, [f"--steps={args.steps}"])
    print(
        "| ranks | step ms off | step ms on | overhead | time in PMA | snapshot ms "
        "| snapshot / 100 steps |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['world_size']} | {r['step_ms_off']:.1f} | {r['step_ms_on']:.1f} "
        f"| {r['overhead']:+.2%} ± {r['error']:.2%} | {r['time_in_pma']:.3%} "
        f"| {r['snapshot_ms']:.2f} | {r['snapshot_share_of_100_steps']:.3%} |"
    )
    save_figures(args.out, r)


if __name__ == "__main__":
    main()
