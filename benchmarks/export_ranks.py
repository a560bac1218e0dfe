"""HF export of an FSDP2-sharded model at 1, 2 and 4 ranks against a plain sequential write of
the same bytes to the same disk, and each rank's extra peak memory, in one run.

    python -m benchmarks.export_ranks [--params-millions 200] [--ranks 1,2,4] [--dir PATH]

Each world size runs under torchrun in fresh processes. A rank's extra peak (``ru_maxrss``
over its resident size before the export) must stay near two output files plus one tensor on a
writer, whatever the world size, since each tensor is gathered to the rank that writes it only.
The plain write is rank 0 alone writing every byte with ``write`` + ``fsync``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine, peak_rss_bytes, torchrun_json, write_json

TENSOR_SHAPE = (4096, 4096)


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pma_dist.export import export_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    count = max(1, args.params_millions * 1_000_000 // (TENSOR_SHAPE[0] * TENSOR_SHAPE[1]))
    with torch.device("meta"):
        model = nn.Module()
        model.blocks = nn.ModuleList(nn.Linear(*TENSOR_SHAPE, bias=False) for _ in range(count))
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(rank)
    with torch.no_grad():
        for param in model.parameters():
            param.to_local().normal_()
    directory = Path(args.dir)
    nbytes = count * TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 4
    baseline = peak_rss_bytes()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        export_model(model, directory / "export", max_shard_size=f"{args.shard_mb}MB")
        dist.barrier()
        times.append(time.perf_counter() - start)
        if rank == 0:
            shutil.rmtree(directory / "export")
    extra = (peak_rss_bytes() - baseline) / 2**20
    plain = []
    if rank == 0:
        data = torch.randn(TENSOR_SHAPE)
        for _ in range(args.repeats):
            start = time.perf_counter()
            with open(directory / "plain.bin", "wb") as f:
                for _ in range(count):
                    f.write(memoryview(data.numpy()))
                f.flush()
                os.fsync(f.fileno())
            plain.append(time.perf_counter() - start)
            (directory / "plain.bin").unlink()
    extras = [None] * world
    dist.all_gather_object(extras, extra)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        row = {
            "ranks": world,
            "bytes": nbytes,
            "export_GBps": nbytes / min(times) / 1e9,
            "plain_write_GBps": nbytes / min(plain) / 1e9,
            "export_vs_plain": min(plain) / min(times),
            "extra_peak_MB_per_rank": extras,
        }
        print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=int, default=200)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    base = Path(args.dir or tempfile.mkdtemp(prefix="pma_export_ranks_"))
    common = [
        f"--params-millions={args.params_millions}",
        f"--shard-mb={args.shard_mb}",
        f"--repeats={args.repeats}",
        f"--dir={base}",
    ]
    rows = [torchrun_json("benchmarks.export_ranks", int(n), common) for n in args.ranks.split(",")]
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print("| ranks | export GB/s | plain write GB/s | export vs plain | extra peak MB per rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        peaks = ", ".join(f"{p:.0f}" for p in r["extra_peak_MB_per_rank"])
        print(
            f"| {r['ranks']} | {r['export_GBps']:.2f} | {r['plain_write_GBps']:.2f} "
            f"| {r['export_vs_plain']:.0%} | {peaks} |"
        )
    write_json(args.out, {"machine": machine(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
