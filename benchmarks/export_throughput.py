"""HF export throughput against a plain sequential write of the same bytes, and the extra peak
memory of an export as the model grows, measured side by side on the same disk.

    python -m benchmarks.export_throughput [--sizes 50,100,200] [--dir /path/on/target/disk]

Each size runs in a fresh process, so that its peak RSS (``ru_maxrss``) belongs to it alone:
the extra peak of the export over the model itself must stay flat as the model grows (it is
bounded by one output file plus the largest tensor, here ``--shard-mb`` and 64 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine, peak_rss_bytes, write_json

TENSOR_NUMEL = 16 * 1024 * 1024


def _plain_write(tensors: list[torch.Tensor], path: Path) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(memoryview(t.numpy()))
        f.flush()
        os.fsync(f.fileno())


def measure_one(millions: int, directory: Path, shard_mb: int) -> dict:
    """Run in a child process: time both writes of a ``millions``-parameter model."""
    from pma_dist.export import export_model

    numel = millions * 1_000_000
    sizes = [TENSOR_NUMEL] * (numel // TENSOR_NUMEL) + (
        [numel % TENSOR_NUMEL] if numel % TENSOR_NUMEL else []
    )
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.randn(s)) for s in sizes)
    tensors = [p.detach() for p in model.parameters()]
    baseline = peak_rss_bytes()
    times = {}
    for _ in range(3):
        start = time.perf_counter()
        _plain_write(tensors, directory / "plain.bin")
        times.setdefault("plain", []).append(time.perf_counter() - start)
        (directory / "plain.bin").unlink()
        start = time.perf_counter()
        export_model(model, directory / "export", max_shard_size=f"{shard_mb}MB", progress=False)
        times.setdefault("export", []).append(time.perf_counter() - start)
        shutil.rmtree(directory / "export")
    nbytes = sum(t.numel() * 4 for t in tensors)
    plain, export = min(times["plain"]), min(times["export"])
    return {
        "params_millions": millions,
        "bytes": nbytes,
        "plain_write_GBps": nbytes / plain / 1e9,
        "export_GBps": nbytes / export / 1e9,
        "export_throughput_vs_plain": plain / export,
        "model_rss_MB": baseline / 2**20,
        "export_extra_peak_MB": (peak_rss_bytes() - baseline) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="50,100,200", help="millions of parameters")
    parser.add_argument("--dir", help="directory on the disk to measure (default: a temp dir)")
    parser.add_argument("--shard-mb", type=int, default=256, help="max_shard_size of the export")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="pma_export_bench_"))
    if args.child is not None:
        print(json.dumps(measure_one(args.child, base, args.shard_mb)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.export_throughput",
                "--child",
                str(size),
                "--dir",
                str(base),
                "--shard-mb",
                str(args.shard_mb),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)
    print(
        "| params | plain write GB/s | export GB/s | export vs plain | model RSS MB "
        "| export extra peak MB |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['params_millions']}M | {r['plain_write_GBps']:.2f} | {r['export_GBps']:.2f} "
            f"| {r['export_throughput_vs_plain']:.0%} | {r['model_rss_MB']:.0f} "
            f"| {r['export_extra_peak_MB']:.0f} |"
        )
    write_json(
        args.out, {"machine": machine(torch.device("cpu")), "shard_mb": args.shard_mb, "rows": rows}
    )


if __name__ == "__main__":
    main()
