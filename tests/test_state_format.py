"""Saved state: format 2 is what is written, format 1 (committed fixtures written by the last
version-1 code, tests/data/make_state_v1.py) and the ``.pt`` files of earlier format-2 releases
still load, and a state file can neither run code nor pass an edited header."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from pma_dist import Merger, PMAConfig, PMAStateError
from pma_dist.testing import assert_bitwise_equal, assert_close_rel, merge_reference, run_ranks
from tests.support.models import full_state, make_buffered_model

FIXTURES = Path(__file__).parent / "data" / "state_v1"
WINDOW = PMAConfig(method="wma", window=3, interval_steps=2)
RUNNING = PMAConfig(method="ema", window=None, interval_steps=2)


def _reference() -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(FIXTURES / "reference.safetensors")
    count = len({k.split(".")[0] for k in tensors if k.startswith("snapshot")})
    snapshots = [
        {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"snapshot{i}.")}
        for i in range(count)
    ]
    live = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("live.")}
    return snapshots, live


def _merged(model, merger: Merger, methods=("sma", "wma", "ema")) -> dict[str, torch.Tensor]:
    out = {}
    for method in methods:
        with merger.swapped(method):
            state = {**full_state(model), "balance": model.balance.detach().clone()}
            out.update({f"{method}.{k}": v for k, v in state.items()})
    return out


def _v1_worker(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from tests.support.models import shard_fsdp2

    model = shard_fsdp2(make_buffered_model(seed=5), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    window, running = Merger(model, optimizer, WINDOW), Merger(model, optimizer, RUNNING)
    state = {"model": get_model_state_dict(model), "pma": window, "pma_running": running}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planner = DefaultLoadPlanner(allow_partial_load=True)
        dcp.load(state, checkpoint_id=str(FIXTURES / "dcp"), planner=planner)
    out = {
        "warnings": [str(w.message) for w in caught],
        "history": window.history,
        "counts": (window.num_snapshots, running.num_snapshots, window.schedule.steps_seen),
        "window": _merged(model, window),
        "running": _merged(model, running, (None,)),
    }
    from_files = Merger(model, optimizer, WINDOW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_files.load(FIXTURES / "files")
    out["files_warnings"] = [str(w.message) for w in caught]
    out["files"] = _merged(model, from_files)
    from_files.save(Path(root) / "v2")
    again = Merger(model, optimizer, WINDOW)
    again.load(Path(root) / "v2")
    out["v2"] = _merged(model, again)
    return out if rank == 0 else {}


def test_version_1_dcp_and_rank_files_load(tmp_path: Path) -> None:
    snapshots, live = _reference()
    result = run_ranks(_v1_worker, 2, str(tmp_path))[0]
    assert result["counts"] == (4, 4, 9)
    assert result["history"] == [(4, 0), (6, 0), (8, 0)], "slot records rebuilt from format 1"
    for method in ("sma", "wma", "ema"):
        expected = merge_reference(snapshots[-3:], method)
        merged = {
            k.split(".", 1)[1]: v for k, v in result["window"].items() if k.startswith(method)
        }
        assert_close_rel(
            {k: v for k, v in merged.items() if k != "balance"}, expected, 1e-6, method
        )
        assert torch.equal(merged["balance"], live["balance"]), "buffers start from live values"
    running = {k.split(".", 1)[1]: v for k, v in result["running"].items() if k != "None.balance"}
    assert_close_rel(running, merge_reference(snapshots, "ema"), 1e-6, "running EMA")
    for messages in (result["warnings"], result["files_warnings"]):
        assert any("format 1 holds no buffers: balance" in m for m in messages), messages
    assert_bitwise_equal(result["files"], result["window"], "per-rank files equal DCP")
    assert_bitwise_equal(result["v2"], result["files"], "saved again in today's format, reloaded")
    index = json.loads((tmp_path / "v2" / "pma_index.json").read_text())
    assert index["version"] == 2 and index["header"]["meta"]["format"] == 2, (
        "read by format-2 readers"
    )
    assert index["header"]["meta"]["compression"] == "none"


def _assert_fixture_loads(model, directory: Path, snapshots: list, what: str) -> None:
    """The state of tests/data/make_state_v2_pt.py's run, saved under ``directory``, loads into
    a fresh Merger: 3 snapshots counted, the last two held, their SMA in the swap."""
    loaded = Merger(model, None, PMAConfig(method="sma", window=2, interval_steps=1))
    loaded.load(directory)
    assert loaded.num_snapshots == 3 and loaded.history == [(2, 0), (3, 0)]
    with loaded.swapped():
        merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert_close_rel(merged, merge_reference(snapshots[1:], "sma"), 1e-6, what)


def test_indexes_listing_every_ranks_fragments_still_load(tmp_path: Path) -> None:
    """Indexes of earlier releases list each rank's fragments instead of run series
    (tests/data/make_state_v2_index.py): they load, whole and per tensor."""
    import shutil

    from pma_dist.state import SavedTensors
    from tests.data.make_state_v2_index import HERE, saved_run

    model, _, snapshots = saved_run()
    directory = Path(shutil.copytree(HERE, tmp_path / "state"))
    assert "files" in json.loads((directory / "pma_index.json").read_text())
    _assert_fixture_loads(model, directory, snapshots, "earlier index")
    saved = SavedTensors(directory)
    third, second = saved.read("head.weight", [0, 1])
    saved.close()
    assert torch.equal(third, snapshots[2]["head.weight"]), "slot 0 holds the third snapshot"
    assert torch.equal(second, snapshots[1]["head.weight"])


class _RunsCode:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_earlier_pt_state_files_load_never_run_code_and_refuse_edited_headers(
    tmp_path: Path,
) -> None:
    """The ``.pt`` per-rank files of earlier format-2 releases (tests/data/make_state_v2_pt.py)
    still load, and the reader of them refuses crafted and edited files."""
    import shutil

    from tests.data.make_state_v2_pt import HERE, saved_run

    model, _, snapshots = saved_run()
    directory = Path(shutil.copytree(HERE, tmp_path / "state"))
    _assert_fixture_loads(model, directory, snapshots, "earlier .pt save")

    path = directory / "pma_rank00000.pt"
    good = path.read_bytes()
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "code-ran"
    fresh = Merger(model, None, PMAConfig(method="sma", window=2, interval_steps=1))
    before = full_state(model)

    torch.save({**payload, "extra": _RunsCode(marker)}, path)
    for attempt in (fresh.check_saved, fresh.load):
        with pytest.raises(PMAStateError, match="never unpickles"):
            attempt(directory)
    assert not marker.exists(), "the crafted file ran code"

    payload["header"]["count"] = 7
    torch.save(payload, path)
    with pytest.raises(PMAStateError, match="header does not match its checksum"):
        fresh.load(directory)
    assert fresh.num_snapshots == 0 and fresh.history == []
    assert_bitwise_equal(full_state(model), before, "nothing changed")

    path.write_bytes(good)
    fresh.load(directory)
    assert fresh.num_snapshots == 3


def test_inspect_reads_version_1_state() -> None:
    from pma_dist.state import read_pma_summary

    summary = read_pma_summary(FIXTURES / "dcp")
    assert summary["format"] == 1 and summary["num_snapshots"] == 4
    assert summary["history"] == [[4, 0], [6, 0], [8, 0]]
