"""The benchmark harnesses run (tiny sizes; the figures themselves live in ``make bench``)."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def test_benchmark_harness_smoke(tmp_path: Path) -> None:
    out = tmp_path / "snapshot.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.snapshot_bandwidth", "--sizes", "1", "--repeats", "1"]
        + ["--out", str(out)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["bytes"] == 4_000_000 and row["window_bandwidth_vs_copy"] > 0


@pytest.mark.parametrize(
    "module, args, key",
    [
        (
            "benchmarks.online_vs_offline",
            ["--params-millions", "1", "--window", "2", "--repeats", "1"],
            "rows",
        ),
        ("benchmarks.memory_per_rank", ["--params-millions", "2", "--sizes", "1,2"], "rows"),
        ("benchmarks.training_overhead", ["--steps", "3"], "overhead"),
        (
            "benchmarks.training_overhead",
            [
                "--model",
                "llama-1b",
                "--nproc",
                "1",
                "--steps",
                "2",
                "--interval",
                "2",
                "--offload",
                "none,cpu",
                "--seq-len",
                "16",
                "--batch",
                "2",
                "--sizes",
                '{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, '
                '"num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 64}',
            ],
            "rows",
        ),
        ("benchmarks.compressed_window", ["--speed-only", "--params-millions", "1"], "speed"),
        (
            "benchmarks.compressed_window",
            ["--snapshots", "8", "--warm-steps", "4", "--params-millions", "1", "--repeats", "1"],
            "accuracy",
        ),
        (
            "benchmarks.export_ranks",
            ["--params-millions", "17", "--ranks", "1,2", "--repeats", "1"],
            "rows",
        ),
    ],
)
def test_more_benchmark_harnesses_smoke(
    tmp_path: Path, module: str, args: list[str], key: str
) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["machine"]["torch"] and key in figures


def test_paired_overhead_cancels_drift_and_charges_snapshot_steps() -> None:
    from benchmarks.common import paired_overhead

    rng = random.Random(0)
    drift = [0.100 * (1 + 0.2 * (i // 100 % 2)) for i in range(1000)]
    off = [d + rng.gauss(0, 0.002) for d in drift]
    on = [d + rng.gauss(0, 0.002) + (0.050 if i % 100 == 37 else 0.0) for i, d in enumerate(drift)]
    measured = paired_overhead(off, on)
    truth = 0.050 / 100 / statistics.mean(off)
    assert abs(measured["overhead"] - truth) < max(measured["error"], 1e-4)
    assert measured["error"] < 0.005
    slowed = paired_overhead(off, [t * 1.01 for t in on])
    assert slowed["overhead"] - slowed["error"] > 0.009
