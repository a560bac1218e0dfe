"""The reference program (launch/train.py) end to end, in tiny sizes: FSDP2 dense and MoE,
DeepSpeed ZeRO-3, two torchrun nodes (HSDP), resume from its own checkpoint, --data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pma_dist.export import verify_export
from tests.support.program import tiny_config, torchrun, two_nodes


def _check_run(run_dir: Path, done) -> dict:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["val_loss"]) == {"constant", "pma", "annealed"}
    assert set(report["val_loss_pma_methods"]) == {"sma", "wma", "ema"}
    assert report["replicas_agree"] is True
    for name, path in report["exports"].items():
        assert verify_export(path) == [], name
        assert (Path(path) / "tokenizer_config.json").is_file()
    assert (run_dir / "curves.png").stat().st_size > 0
    assert "PMA wma of branch (a)" in done.stdout
    ablation = report["ablation"]
    for phase in ("fork", "end"):
        merges = {m["merge"]: m["loss"] for m in ablation[phase]["merges"]}
        assert set(merges) == {"sma N=2 stride=1", "wma N=2 stride=1", "ema N=2 stride=1"}
        assert ablation[phase]["selected"] == min(merges, key=merges.get)
    assert ablation["end"]["live"] == report["val_loss"]["constant"]
    assert (run_dir / "ablations.png").stat().st_size > 0
    assert verify_export(run_dir / "exports" / "best") == []
    assert "select picked fork: " in done.stdout
    return report


def test_fsdp2_dense_run_and_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "dense.yaml", checkpoint_every=4)
    full = _check_run(
        tmp_path / "full", torchrun("--config", str(config), "--run-dir", str(tmp_path / "full"))
    )
    stopped = torchrun(
        "--config", str(config), "--run-dir", str(tmp_path / "resumed"), "--stop-after", "4"
    )
    assert stopped.returncode == 0 and "stopped after step 4" in stopped.stdout, stopped.stderr[
        -3000:
    ]
    assert not (tmp_path / "resumed" / "report.json").exists()
    resumed = torchrun("--config", str(config), "--run-dir", str(tmp_path / "resumed"), "--resume")
    again = _check_run(tmp_path / "resumed", resumed)
    assert again["val_loss"] == full["val_loss"], "resuming mid-run changed the results"
    assert again["fork"] == full["fork"]
    assert again["ablation"] == full["ablation"], "the monitor resumed with the run"
    merged = full["exports"]["pma"]
    init = torchrun(
        "--config", str(config), "--run-dir", str(tmp_path / "init"), "--init-from", merged
    )
    started = json.loads((tmp_path / "init" / "log.jsonl").read_text().splitlines()[0])
    fresh = json.loads((tmp_path / "full" / "log.jsonl").read_text().splitlines()[0])
    assert init.returncode == 0, init.stderr[-3000:]
    assert started["live"] < fresh["live"], "PMA-init must start from the merged weights"


def test_fsdp2_moe_on_a_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    data.mkdir()
    for i in range(40):
        (data / f"doc{i:02d}.txt").write_text(
            f"document {i}\n" + "the quick brown fox jumps over the lazy dog\n" * 60
        )
    (data / "image.bin").write_bytes(b"\0\1\2" * 100)
    config = tiny_config(tmp_path / "moe.yaml", model={"arch": "mixtral", "num_local_experts": 4})
    done = torchrun(
        "--config", str(config), "--run-dir", str(tmp_path / "run"), "--data", str(data)
    )
    report = _check_run(tmp_path / "run", done)
    assert report["config"]["data"]["path"] == str(data)
    exported = json.loads((tmp_path / "run" / "exports" / "pma" / "config.json").read_text())
    assert exported["model_type"] == "mixtral"


def test_deepspeed_zero3_runs_exit_cleanly_every_time(tmp_path: Path) -> None:
    """A ZeRO-3 process left to interpreter teardown could abort there (see launch/train.py);
    the program ends with destroy_process_group, and three runs in a row all exit 0."""
    pytest.importorskip("deepspeed")
    config = tiny_config(tmp_path / "ds.yaml", engine="deepspeed", zero_stage=3)
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        _check_run(run_dir, torchrun("--config", str(config), "--run-dir", str(run_dir)))


def test_two_torchrun_nodes_train_with_hsdp(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "nodes.yaml")
    node0, node1 = two_nodes("--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert node0.returncode == node1.returncode == 0, (
        f"node 0:\n{node0.stderr[-3000:]}\nnode 1:\n{node1.stderr[-3000:]}"
    )
    report = _check_run(tmp_path / "run", node0)
    assert report["world_size"] == 4


@pytest.mark.parametrize(
    "make, message", [(lambda p: p / "missing", "no such directory"), (lambda p: p, "need text")]
)
def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path: Path, make, message) -> None:
    config = tiny_config(tmp_path / "c.yaml")
    folder = make(tmp_path / "empty")
    (tmp_path / "empty").mkdir(exist_ok=True)
    done = torchrun(
        "--config", str(config), "--run-dir", str(tmp_path / "run"), "--data", str(folder), nproc=1
    )
    assert done.returncode != 0
    assert message in done.stderr + done.stdout
