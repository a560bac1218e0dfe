"""Timing helpers shared by the benchmarks: interleaved repeats, medians, machine description."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
"""The root the benchmarks run from (``python -m benchmarks.<name>``)."""


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)


def interleaved_medians(
    cases: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of each case, the cases run in turn each round so that drift of a shared
    machine hits all of them alike. One untimed warm-up round first."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):
        for name, fn in cases.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine(device: torch.device) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": date.today().isoformat(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``), in bytes."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def torchrun_json(module: str, nproc: int, args: list[str]) -> dict:
    """Run ``python -m module --worker ARGS`` on ``nproc`` local ranks with torchrun, from the
    repository root, and return the JSON object rank 0 printed last; exit with the ranks'
    stderr if they failed."""
    import os
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", module, "--worker", *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, cwd=REPOSITORY
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        sys.exit(f"{module} on {nproc} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def save_figures(path: str | None, payload: dict) -> None:
    """``payload`` plus a description of this machine, as JSON at ``path`` (if given)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_json(path, {"machine": machine(device), **payload})


def paired_overhead(off: list[float], on: list[float]) -> dict[str, float]:
    """Relative extra time of the "on" steps, from steps run alternately on and off.

    Alternating every step puts each "on" step next to an "off" step, so the drift of a shared
    machine (block means move by several percent) cancels in the pairwise differences. Every
    "on" step counts, the snapshot steps whole. ``error`` is two standard errors of the mean
    difference, relative like ``overhead``.
    """
    diffs = [b - a for a, b in zip(off, on)]
    base = statistics.mean(off)
    error = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"overhead": statistics.mean(diffs) / base, "error": error / base}


def record_merger_steps(merger) -> list[float]:
    """Wrap ``merger.step`` to record the seconds of each call.

    On CPU the snapshot runs inside the call, so the sum is the time training spends in PMA.
    """
    calls: list[float] = []
    inner = merger.step

    def step(*args, **kwargs) -> bool:
        start = time.perf_counter()
        took = inner(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return took

    merger.step = step
    return calls
