"""Snapshot cost against a plain copy of the same bytes, measured side by side in one run.

    python -m benchmarks.snapshot_bandwidth [--sizes 10,50,100,200] [--device cuda]

For shards of 10M to 200M fp32 parameters (a mix of tensor sizes, like a model's), it times
``torch._foreach_copy_`` and a loop of ``copy_`` into one preallocated buffer, the same copy
into ``window`` buffers in turn (the memory footprint of a ring), and one Merger
snapshot in window mode (a copy into the ring) and in running mode (one lerp: two reads, one
write), each with the non-finite check off (``on_nonfinite="ignore"``) and on (``"skip"``, the
default: window mode tests what it copies in the same pass, by the compiled CPU kernel or the
Triton kernel on a GPU, and agrees with the other ranks once a window, which is in the timing;
running mode reads the shard once more and all-reduces a scalar). Targets: window >= 90% of
copy bandwidth, running <= 1.5x a copy, the default window snapshot <= 1.05x the time of a
copy. Also the checked window snapshot with those kernels turned off (``window_skip_unfused``:
each block summed after it is copied), and on a GPU an offloaded snapshot against a plain
pinned device-to-host copy.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.common import interleaved_medians, machine, write_json
from pma_dist import Merger, PMAConfig
from pma_dist.kernels import unfused

TENSOR_SIZES = [4096 * 4096, 4096 * 1024, 1024 * 1024, 4096, 4096]


class Shard(nn.Module):
    """``numel`` parameters in tensors of model-like sizes (matrices, then vectors)."""

    def __init__(self, numel: int, device: torch.device) -> None:
        super().__init__()
        sizes, left, i = [], numel, 0
        while left > 0:
            size = min(TENSOR_SIZES[i % len(TENSOR_SIZES)], left)
            sizes.append(size)
            left -= size
            i += 1
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(s, device=device)) for s in sizes)


def bench_size(millions: int, device: torch.device, repeats: int, window: int) -> dict:
    shard = Shard(millions * 1_000_000, device)
    params = [p.detach() for p in shard.parameters()]
    copies = [torch.empty_like(p) for p in params]
    ring = [[torch.zeros_like(p) for p in params] for _ in range(window)]
    turn = iter(range(10**9))
    mergers = {
        f"{mode}_{check}": Merger(
            shard,
            None,
            PMAConfig(
                window=window if mode == "window" else None, interval_steps=1, on_nonfinite=check
            ),
        )
        for mode in ("window", "running")
        for check in ("ignore", "skip")
    }
    for merger in mergers.values():
        merger.snapshot()
    cases = {
        "foreach_copy": lambda: torch._foreach_copy_(copies, params),
        "copy_loop": lambda: [c.copy_(p) for c, p in zip(copies, params)],
        "ring_copy": lambda: torch._foreach_copy_(ring[next(turn) % window], params),
        **{name: merger.snapshot for name, merger in mergers.items()},
        "window_skip_unfused": lambda: _unfused(mergers["window_skip"].snapshot),
    }
    if device.type == "cuda":
        pinned = [torch.empty(p.shape, pin_memory=True) for p in params]
        offloaded = Merger(
            shard, None, PMAConfig(window=2, interval_steps=1, offload="cpu", on_nonfinite="ignore")
        )
        cases["d2h_copy"] = lambda: [h.copy_(p, non_blocking=True) for h, p in zip(pinned, params)]
        cases["window_offload"] = offloaded.snapshot
    t = interleaved_medians(cases, device, repeats)
    copy = t["foreach_copy"]
    row = {
        "params_millions": millions,
        "bytes": sum(p.numel() * p.element_size() for p in params),
        "seconds": t,
        "copy_GBps": 2 * sum(p.numel() * 4 for p in params) / copy / 1e9,
        "window_bandwidth_vs_copy": copy / t["window_ignore"],
        "window_bandwidth_vs_ring_copy": t["ring_copy"] / t["window_ignore"],
        "window_checked_bandwidth_vs_copy": copy / t["window_skip"],
        "window_checked_time_vs_copy": t["window_skip"] / copy,
        "window_checked_unfused_time_vs_copy": t["window_skip_unfused"] / copy,
        "running_cost_vs_copy": t["running_ignore"] / copy,
        "running_checked_cost_vs_copy": t["running_skip"] / copy,
    }
    if "d2h_copy" in t:
        row["window_offload_bandwidth_vs_d2h"] = t["d2h_copy"] / t["window_offload"]
    return row


def _unfused(snapshot) -> None:
    """``snapshot()`` with the checked copy on torch's kernels (copy, then sum) instead of the
    one-pass CPU or Triton kernel."""
    with unfused():
        snapshot()


def table(rows: list[dict]) -> str:
    lines = [
        "| params/rank | copy_ GB/s | window, BW vs copy_ | vs ring copy "
        "| window + check (default), time vs copy_ | + check, unfused "
        "| running, time vs copy_ | running + check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['params_millions']}M | {r['copy_GBps']:.1f} "
            f"| {r['window_bandwidth_vs_copy']:.0%} | {r['window_bandwidth_vs_ring_copy']:.0%} "
            f"| {r['window_checked_time_vs_copy']:.2f}x "
            f"| {r['window_checked_unfused_time_vs_copy']:.2f}x "
            f"| {r['running_cost_vs_copy']:.2f}x | {r['running_checked_cost_vs_copy']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,100,200", help="millions of parameters per rank")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--window", type=int, default=4, help="ring size (cost does not depend on it)"
    )
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [bench_size(int(s), device, args.repeats, args.window) for s in args.sizes.split(",")]
    print(table(rows))
    write_json(args.out, {"machine": machine(device), "rows": rows})


if __name__ == "__main__":
    main()
