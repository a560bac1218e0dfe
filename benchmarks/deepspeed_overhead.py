"""PMA under DeepSpeed ZeRO-2 and ZeRO-3 on this machine's ranks, side by side in one run.

    python -m benchmarks.deepspeed_overhead [--nproc 2] [--params-millions 20]

Per stage: (1) one snapshot of the fp32 master partition (window mode, with and without the
non-finite check) against ``_foreach_copy_`` of the same partition bytes; (2) training-step
time with PMA on (interval 100 steps, window 10) against PMA off on the same engine (its
``step`` without the PMA hook), the two taking turns step by step so that the machine's drift
cancels, every call of the PMA hook timed too (as in training_overhead.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from benchmarks.common import save_figures, torchrun_json


def _model(millions: float, width: int = 1024):
    import torch
    from torch import nn

    layers = max(1, int(millions * 1e6 // (width * width)))
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(layers)]
    ), torch


def _engine(stage: int, millions: float, pma: dict | None, world: int):
    from pma_dist.deepspeed import initialize

    model, torch = _model(millions)
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    if pma:
        config["pma"] = pma
    engine, *_ = initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=config
    )
    return engine


def _train(engine, steps: dict, count: int) -> dict[str, list[float]]:
    """Seconds of each of ``count`` steps per setting, the settings taking turns step by step."""
    import torch

    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    times = {name: [] for name in steps}
    for _ in range(count):
        for name, step in steps.items():
            start = time.perf_counter()
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss)
            step()
            times[name].append(time.perf_counter() - start)
    return times


def worker(args) -> None:
    import statistics

    import torch
    import torch.distributed as dist

    from benchmarks.common import interleaved_medians, paired_overhead, record_merger_steps

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for stage in (2, 3):
        window = {"method": "sma", "window": 10, "interval_steps": 1, "on_nonfinite": "ignore"}
        checked = {**window, "on_nonfinite": "skip"}
        engine = _engine(stage, args.params_millions, window, world)
        merger_checked = None
        shards = [s.local for s in engine.pma.backend.shards()]
        copies = [torch.empty_like(t) for t in shards]
        from pma_dist import Merger, PMAConfig

        merger_checked = Merger(engine, engine.optimizer, PMAConfig(**checked))
        t = interleaved_medians(
            {
                "copy": lambda copies=copies, shards=shards: torch._foreach_copy_(copies, shards),
                "window": engine.pma.snapshot,
                "window_checked": merger_checked.snapshot,
            },
            torch.device("cpu"),
            args.repeats,
        )
        del engine, merger_checked
        engine = _engine(
            stage,
            args.params_millions,
            {"method": "sma", "window": 10, "interval_steps": 100},
            world,
        )
        steps = {"on": engine.step, "off": type(engine).step.__get__(engine)}
        _train(engine, steps, 3)
        calls = record_merger_steps(engine.pma)
        times = _train(engine, steps, args.steps)
        snapshots = engine.pma.num_snapshots
        row = {
            "stage": stage,
            "partition_bytes": sum(s.numel() * 4 for s in shards),
            "snapshot_seconds": t,
            "window_bandwidth_vs_copy": t["copy"] / t["window"],
            "window_checked_bandwidth_vs_copy": t["copy"] / t["window_checked"],
            "step_ms_off": 1000 * statistics.mean(times["off"]),
            "step_ms_on": 1000 * statistics.mean(times["on"]),
            "snapshots_taken": snapshots,
            **paired_overhead(times["off"], times["on"]),
            "time_in_pma": sum(calls) / sum(times["on"]),
        }
        row["snapshot_share_of_100_steps"] = t["window_checked"] / (row["step_ms_off"] / 10)
        rows.append(row)
        del engine
    if rank == 0:
        print(json.dumps({"world_size": world, "rows": rows}), flush=True)
    dist.barrier()
    # Leave without interpreter teardown: DeepSpeed's shared-memory communicator can abort in it.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--params-millions", type=float, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=400, help="timed steps per setting")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    worker_args = [
        f"--params-millions={args.params_millions}",
        f"--repeats={args.repeats}",
        f"--steps={args.steps}",
    ]
    result = torchrun_json("benchmarks.deepspeed_overhead", args.nproc, worker_args)
    print(
        "| ZeRO | partition MB/rank | window BW vs copy | + check | step ms off | step ms on "
        "| overhead | time in PMA | snapshot / 100 steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['stage']} | {r['partition_bytes'] / 2**20:.0f} "
            f"| {r['window_bandwidth_vs_copy']:.0%} "
            f"| {r['window_checked_bandwidth_vs_copy']:.0%} | {r['step_ms_off']:.1f} "
            f"| {r['step_ms_on']:.1f} | {r['overhead']:+.2%} ± {r['error']:.2%} "
            f"| {r['time_in_pma']:.3%} | {r['snapshot_share_of_100_steps']:.3%} |"
        )
    save_figures(args.out, result)


if __name__ == "__main__":
    main()
