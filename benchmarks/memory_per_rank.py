"""Averaging-state memory per rank against world size under FSDP2, and against a full-model
copy per rank (what ``torch.optim.swa_utils.AveragedModel`` keeps), side by side in one run.

    python -m benchmarks.memory_per_rank [--params-millions 16] [--sizes 1,2,4]

For each world size it starts that many CPU ranks, shards the same model with FSDP2 and reads
the resident memory (RSS) each rank gains when an AveragedModel of the unsharded model, then a
running-mode Merger, then a window-mode Merger (N = 10) are built, keeping each alive so that
no freed memory is reused (a Merger commits its slots at construction). The JSON also holds
the exact slot bytes.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.common import save_figures, torchrun_json

MB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(millions: float) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.optim.swa_utils import AveragedModel

    from pma_dist import Merger, PMAConfig

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    def used() -> int:
        return torch.cuda.memory_allocated() if cuda else rss()

    width = 1024
    layers = max(1, int(millions * 1e6 // (width * width)))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(device)

    sharded = model()
    mesh = init_device_mesh(device.type, (world,))
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    row = {
        "world_size": world,
        "params": sum(p.numel() for p in sharded.parameters()),
        "measure": "cuda memory_allocated" if cuda else "RSS",
    }
    kept = []
    full = model()
    gc.collect()
    before = used()
    kept.append(AveragedModel(full))
    row["averaged_model_MB"] = (used() - before) / MB
    for name, window in (("running", None), ("window10", 10)):
        before = used()
        merger = Merger(sharded, None, PMAConfig(window=window, interval_steps=1))
        row[f"{name}_MB"] = (used() - before) / MB
        row[f"{name}_state_MB"] = sum(t.numel() * 4 for s in merger._state.slots for t in s) / MB
        kept.append(merger)
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        print(json.dumps({"rows": rows}))
    dist.barrier()  # ranks leave together (docs/semantics.md, "Exit")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=float, default=16)
    parser.add_argument("--sizes", default="1,2,4")
    parser.add_argument("--out")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.params_millions)
    table = []
    for world in (int(s) for s in args.sizes.split(",")):
        args_ = [f"--params-millions={args.params_millions}"]
        ranks = torchrun_json("benchmarks.memory_per_rank", world, args_)["rows"]
        worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k.endswith("MB")}
        first = {k: ranks[0][k] for k in ("params", "measure")}
        table.append({"world_size": world, **first, **worst})
    print(
        "| ranks | window N=10 MB/rank | running MB/rank | AveragedModel MB/rank "
        "| running vs AveragedModel |"
    )
    print("|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['world_size']} | {r['window10_MB']:.0f} | {r['running_MB']:.0f} "
            f"| {r['averaged_model_MB']:.0f} | {r['running_MB'] / r['averaged_model_MB']:.2f} |"
        )
    save_figures(args.out, {"rows": table})


if __name__ == "__main__":
    main()
