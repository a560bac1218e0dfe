"""Run launch/train.py the way users do (torchrun), with a tiny config written for the test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from pma_dist.testing import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "model": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 40,
    },
    "data": {"seq_len": 32, "batch_per_rank": 4, "eval_batches": 1, "max_bytes": 600_000},
    "schedule": {"lr": 3e-3, "warmup_steps": 2, "fork_step": 8, "branch_steps": 4, "eval_every": 4},
    "pma": {"method": "wma", "window": 3, "interval_steps": 2},
}


def tiny_config(path: Path, **overrides) -> Path:
    config = {**TINY, **overrides}
    for key in ("model", "data", "schedule"):
        config[key] = {**TINY[key], **overrides.get(key, {})}
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(
    *args: str, nproc: int = 2, extra: tuple[str, ...] = (), timeout: float = 600
) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (or the given rendezvous ``extra``) of launch/train.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    rendezvous = extra or ("--standalone",)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        f"--nproc-per-node={nproc}",
        str(ROOT / "launch" / "train.py"),
        *args,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def two_nodes(
    *args: str, nproc: int = 2, timeout: float = 600
) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents acting as nodes 0 and 1, meeting over loopback (c10d rendezvous)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    procs = []
    for node in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
            f"--nproc-per-node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=pma-test", str(ROOT / "launch" / "train.py"), *args,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results
