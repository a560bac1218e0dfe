"""Per-rank cost at scale for the shipped architectures: ``pma-dist plan`` at several world sizes.

    python -m benchmarks.scale_plan [--worlds 64,512,1024] [--window 10] [--out plan.json]

One rank (rank 0, which FSDP2's row chunking gives the most) of each world size, simulated on
PyTorch's fake process group with the model on the meta device (see :mod:`pma_dist.tools`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from benchmarks.common import machine, write_json
from pma_dist.tools import SHIPPED, plan

GB = 1e9


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | world | state/rank | snapshot moves | resume reads | export peak "
        "| interval V |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['total_params'] / 1e9:.0f}B | {r['world']} "
            f"| {r['state_bytes_per_rank'] / GB:.2f} GB "
            f"| {r['snapshot_bytes_per_rank'] / GB:.2f} GB "
            f"| {r['resume_read_bytes_per_rank'] / GB:.2f} GB "
            f"| {r['export_peak_bytes_per_rank'] / GB:.1f} GB "
            f"| {r['suggested_interval_tokens'] / 1e9:.0f}B |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHIPPED))
    parser.add_argument("--worlds", default="64,512,1024")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    rows = [
        asdict(plan(model, int(world), window=args.window))
        for model in args.models.split(",")
        for world in args.worlds.split(",")
    ]
    print(table(rows))
    write_json(args.out, {"machine": machine(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
