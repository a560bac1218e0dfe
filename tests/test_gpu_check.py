"""tools/gpu_check.sh without a GPU: it refuses at once; its result writer and summary, on
results made up the way each part writes them, say which targets were met."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import ROOT

TOOL = [sys.executable, str(ROOT / "tools" / "gpu_check.py")]


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=120)


def test_it_refuses_at_once_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked"
    ]
    assert not (tmp_path / "out").exists(), "nothing written"


def test_results_and_the_summary_say_which_targets_were_met(tmp_path: Path) -> None:
    out, raw = tmp_path / "out", tmp_path / "raw"
    raw.mkdir()
    (raw / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase name="test_a"/><testcase name="test_b"><failure>boom</failure></testcase>'
        '<testcase name="test_c"/></testsuite></testsuites>'
    )
    rows = [
        {"params_millions": 100, "window_checked_bandwidth_vs_copy": 0.95,
         "window_offload_bandwidth_vs_d2h": 0.85},
        {"params_millions": 400, "window_checked_bandwidth_vs_copy": 0.7},
    ]  # fmt: skip
    (raw / "snapshot.json").write_text(json.dumps({"rows": rows}))
    overhead = {"rows": [{"offload": "none", "snapshot_share_of_interval": 0.002}]}
    (raw / "overhead.json").write_text(json.dumps(overhead))
    assert _tool("versions", str(out)).returncode == 0
    for part, rc, source in (
        ("tests", 1, "tests.xml"),
        ("snapshot", 0, "snapshot.json"),
        ("overhead", 0, "overhead.json"),
        ("demo", 124, "missing.json"),
        ("compressed", 75, None),
    ):
        args = ["record", str(out), part, str(rc), "12.5"] + ([str(raw / source)] if source else [])
        assert _tool(*args).returncode == 0, part
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert results["tests"]["status"] == "failed"
    assert results["tests"]["figures"]["failed"] == ["test_b"]
    assert results["snapshot"]["verdict"] == "missed: 400M snapshot at 0.70x copy"
    assert results["overhead"]["verdict"] == "met"
    assert results["demo"]["status"] == "timed out" and results["compressed"]["status"] == "skipped"
    assert results["versions"]["python"]
    done = _tool("summary", str(out))
    assert done.returncode == 0
    table = done.stdout.splitlines()
    assert table[0].startswith("gpu check on no device: torch ")
    assert "| snapshot | passed | 12.5 | missed: 400M snapshot at 0.70x copy |" in table
    assert "| demo | timed out | 12.5 | timed out |" in table
    assert json.loads((out / "summary.json").read_text())["parts"]
    assert len(list(out.iterdir())) <= 8, "at most 8 files come back from the device"
