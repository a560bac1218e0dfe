"""``pma-dist config`` and ``pma-dist inspect`` through the installed console script."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from pma_dist import Merger, PMAConfig
from tests.support.cli import run_cli
from tests.support.models import make_model


def test_console_script_is_installed() -> None:
    assert shutil.which("pma-dist", path=str(Path(sys.executable).parent)), (
        "pip install -e . adds pma-dist"
    )


def test_config_validates_yaml_and_deepspeed_json(tmp_path: Path) -> None:
    good = tmp_path / "pma.yaml"
    good.write_text("pma:\n  method: wma\n  interval_tokens: 4B\n")
    done = run_cli("config", str(good))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["interval_tokens"] == 4_000_000_000
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"pma": {"window": 0, "interval_steps": 10}}))
    done = run_cli("config", str(bad))
    assert done.returncode == 2 and "pma.window = 0" in done.stderr


def test_inspect_reads_a_dcp_checkpoint(tmp_path: Path) -> None:
    model = make_model()
    merger = Merger(model, None, PMAConfig(window=3, interval_tokens=100))
    for _ in range(5):
        with torch.no_grad():
            model.head.weight.add_(1.0)
        merger.step(tokens=60)
    dcp.save({"pma": merger}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    done = run_cli("inspect", str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["mode"] == "window" and summary["num_snapshots"] == 3 and summary["slots"] == 3
    assert summary["tokens_seen"] == 300 and summary["history"] == [[2, 120], [4, 240], [5, 300]]
    assert summary["slot_bytes"] == 3 * 4 * sum(p.numel() for p in model.parameters())
    missing = run_cli("inspect", str(tmp_path))
    assert missing.returncode == 2 and "no .metadata" in missing.stderr
