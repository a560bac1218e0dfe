"""Online PMA against the offline way (save N checkpoints, load them, average), same model,
same disk, one run. "online" includes the non-finite check; "unchecked" is
``on_nonfinite="ignore"``, which like the offline tools checks nothing.

    python -m benchmarks.online_vs_offline [--params-millions 50] [--window 10]

Offline, as fairseq's average_checkpoints or mergekit's linear merge do it: N full checkpoints
written during training (safetensors, or DCP), then read back and averaged. Online: N snapshots
into the ring and one merge. Training between checkpoints is the same in both and not timed.
safetensors is timed without and with fsync (durable checkpoints), DCP with fsync (its
default). Reading back from the page cache flatters the offline side: in a real run the N
checkpoints are written hours apart and outgrow the cache, so the "cold" rows evict the files
from it (``posix_fadvise(DONTNEED)``, untimed) before reading them. Each way is run
``--repeats`` times in turn and its best time kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import machine, write_json
from pma_dist import Merger, PMAConfig

TENSOR = 4 * 1024 * 1024


def _model(millions: float) -> nn.Module:
    numel = int(millions * 1e6)
    sizes = [TENSOR] * (numel // TENSOR) + ([numel % TENSOR] if numel % TENSOR else [])
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.randn(s)) for s in sizes)
    return model


def _train(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.001)


def _evict_from_page_cache(paths: list[Path]) -> None:
    """Make the next read of ``paths`` come from the disk: flush, then drop the cached pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def offline_safetensors(
    model: nn.Module, n: int, root: Path, sync: bool, cold: bool = False
) -> tuple[float, int]:
    from safetensors.torch import load_file, save_file

    written, elapsed = 0, 0.0
    for k in range(n):
        _train(model)
        start = time.perf_counter()
        path = root / f"ckpt{k}.safetensors"
        save_file({name: p.detach() for name, p in model.named_parameters()}, str(path))
        if sync:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elapsed += time.perf_counter() - start
        written += path.stat().st_size
    if cold:
        _evict_from_page_cache(sorted(root.glob("ckpt*.safetensors")))
    start = time.perf_counter()
    average = None
    for k in range(n):
        state = load_file(str(root / f"ckpt{k}.safetensors"))
        if average is None:
            average = {name: t.clone() for name, t in state.items()}
        else:
            for name, t in state.items():
                average[name].add_(t)
    for t in average.values():
        t.div_(n)
    return elapsed + time.perf_counter() - start, written


def offline_dcp(model: nn.Module, n: int, root: Path, cold: bool = False) -> tuple[float, int]:
    import torch.distributed.checkpoint as dcp

    written, elapsed = 0, 0.0
    for k in range(n):
        _train(model)
        start = time.perf_counter()
        dcp.save(model.state_dict(), checkpoint_id=str(root / f"dcp{k}"), no_dist=True)
        elapsed += time.perf_counter() - start
        written += sum(f.stat().st_size for f in (root / f"dcp{k}").iterdir())
    if cold:
        _evict_from_page_cache(sorted(root.glob("dcp*/*")))
    start = time.perf_counter()
    average = {name: torch.zeros_like(p) for name, p in model.state_dict().items()}
    buffer = {name: torch.empty_like(p) for name, p in model.state_dict().items()}
    for k in range(n):
        dcp.load(buffer, checkpoint_id=str(root / f"dcp{k}"), no_dist=True)
        for name, t in buffer.items():
            average[name].add_(t)
    for t in average.values():
        t.div_(n)
    return elapsed + time.perf_counter() - start, written


def online(model: nn.Module, n: int, check: str) -> tuple[float, int]:
    merger = Merger(model, None, PMAConfig(window=n, interval_steps=1, on_nonfinite=check))
    elapsed = 0.0
    for _ in range(n):
        _train(model)
        start = time.perf_counter()
        merger.step()
        elapsed += time.perf_counter() - start
    start = time.perf_counter()
    merger.merged_shards("sma")
    return elapsed + time.perf_counter() - start, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=float, default=50)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    parser.add_argument("--dir", help="directory on the disk to use (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="pma_offline_"))
    model = _model(args.params_millions)
    rows = {}
    ways = {
        "offline_safetensors": lambda: offline_safetensors(model, args.window, root, False),
        "offline_safetensors_fsync": lambda: offline_safetensors(model, args.window, root, True),
        "offline_dcp": lambda: offline_dcp(model, args.window, root),
    }
    if hasattr(os, "posix_fadvise"):
        ways["offline_safetensors_fsync_cold"] = lambda: offline_safetensors(
            model, args.window, root, True, cold=True
        )
        ways["offline_dcp_cold"] = lambda: offline_dcp(model, args.window, root, cold=True)
    ways |= {
        "online_pma_dist": lambda: online(model, args.window, "skip"),
        "online_pma_dist_unchecked": lambda: online(model, args.window, "ignore"),
    }
    for _ in range(args.repeats):
        for name, way in ways.items():
            seconds, written = way()
            best = rows.setdefault(name, {"seconds": seconds, "bytes_written": written})
            best["seconds"] = min(best["seconds"], seconds)
            for path in root.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    base = rows["online_pma_dist"]["seconds"]
    print(
        f"| N = {args.window}, {args.params_millions:g}M params | seconds | bytes written "
        "| time vs online |"
    )
    print("|---|---|---|---|")
    for name, row in rows.items():
        megabytes = row["bytes_written"] / 2**20
        ratio = row["seconds"] / base
        print(f"| {name} | {row['seconds']:.2f} | {megabytes:,.0f} MiB | {ratio:.1f}x |")
    write_json(
        args.out,
        {
            "machine": machine(torch.device("cpu")),
            "window": args.window,
            "params_millions": args.params_millions,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
