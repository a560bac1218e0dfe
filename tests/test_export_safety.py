"""Exports are atomic and verifiable: a killed rank, a full disk, a bad path or a flipped byte
never costs the previous export, and never leaves a directory that passes for a complete one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pma_dist import Merger, PMAConfig
from pma_dist.export import MANIFEST, ExportError, export_model, verify_export
from pma_dist.testing import run_rank_outcomes
from tests.support.cli import run_cli
from tests.support.hf_models import hf_train_step, make_hf_model, shard_hf_fsdp2
from tests.support.models import make_model


def _snapshot_dir(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _kill_mid_export_worker(rank: int, world_size: int, root: str) -> str:
    model = shard_hf_fsdp2(make_hf_model("llama", seed=0), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    merger = Merger(model, optimizer, PMAConfig(window=2, interval_steps=1))
    hf_train_step(model, optimizer, 0, rank, world_size)
    merger.step()
    target = Path(root) / "hf"
    merger.export(target, max_shard_size="24KB")
    hf_train_step(model, optimizer, 1, rank, world_size)
    merger.step()
    if rank == 1:
        from pma_dist.export import _hf_writer as hf

        write = hf.HFWriter._write

        def write_then_die(self, file, tensors):
            write(self, file, tensors)
            os.kill(os.getpid(), signal.SIGKILL)

        hf.HFWriter._write = write_then_die
    started = time.monotonic()
    try:
        merger.export(target, max_shard_size="24KB")
    except Exception as err:  # noqa: BLE001 - the survivor reports what it saw
        return f"failed after {time.monotonic() - started:.1f}s: {type(err).__name__}"
    return "export finished"


def test_killed_rank_mid_export_leaves_previous_export_intact(tmp_path: Path) -> None:
    outcomes = run_rank_outcomes(
        _kill_mid_export_worker,
        2,
        str(tmp_path),
        collective_timeout=30,
        stop_on_failure=False,
        timeout=240,
    )
    assert outcomes[1].exitcode == -signal.SIGKILL
    assert outcomes[0].exitcode == 0 and outcomes[0].result.startswith("failed after"), outcomes[0]
    assert float(outcomes[0].result.split()[2].rstrip("s:")) < 60, "survivor must fail in time"
    assert verify_export(tmp_path / "hf") == []
    assert [p.name for p in tmp_path.iterdir()] == ["hf"], (
        "the aborted export left a directory behind"
    )


class _UnsavableTokenizer:
    """A tokenizer whose files cannot be written (raised while the first rank seals)."""

    def save_pretrained(self, directory) -> None:
        raise ValueError("tokenizer cannot be saved")


def _seal_fails_worker(rank: int, world_size: int, root: str) -> str:
    model = make_model()
    export_model(model, Path(root) / "good", progress=False)
    try:
        export_model(model, Path(root) / "good", tokenizer=_UnsavableTokenizer(), progress=False)
    except ExportError as err:
        return str(err)
    return "exported"


def test_a_failure_while_sealing_reaches_every_rank(tmp_path: Path) -> None:
    """Sealing (config, tokenizer, manifest) runs on the first rank alone: whatever it raises,
    the other ranks hear of it at once instead of waiting at the next collective."""
    outcomes = run_rank_outcomes(
        _seal_fails_worker, 2, str(tmp_path), collective_timeout=30, timeout=180
    )
    for outcome in outcomes:
        assert outcome.exitcode == 0, outcome
        assert "ValueError: tokenizer cannot be saved" in outcome.result, outcome.result
    assert verify_export(tmp_path / "good") == []
    assert [p.name for p in tmp_path.iterdir()] == ["good"]


def _first_export(tmp_path: Path):
    model = make_model()
    export_model(model, tmp_path / "good")
    return model, _snapshot_dir(tmp_path / "good")


def test_bad_targets_are_refused_and_nothing_is_overwritten(tmp_path: Path) -> None:
    model, good = _first_export(tmp_path)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"precious")
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    for target, message in (
        (a_file, "is a file"),
        (unrelated, "not a pma_dist export"),
        (tmp_path / "missing" / "out", "does not exist"),
    ):
        with pytest.raises(ExportError, match=message):
            export_model(model, target)
    assert a_file.read_bytes() == b"precious" and (unrelated / "todo.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="format='onnx'"):
        export_model(model, tmp_path / "good", format="onnx")
    assert _snapshot_dir(tmp_path / "good") == good


def test_write_failure_midway_keeps_the_previous_export(tmp_path: Path, monkeypatch) -> None:
    from pma_dist.export import _hf_writer as hf

    model, good = _first_export(tmp_path)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    calls = []

    def failing_write(self, file, tensors):
        calls.append(file)
        if len(calls) == 2:
            raise hf.describe_os_error(
                OSError(28, "No space left on device"), self.directory / file
            )
        return original(self, file, tensors)

    original = hf.HFWriter._write
    monkeypatch.setattr(hf.HFWriter, "_write", failing_write)
    with pytest.raises(ExportError, match="disk full"):
        export_model(model, tmp_path / "good", max_shard_size="8KB")
    assert _snapshot_dir(tmp_path / "good") == good
    assert [p.name for p in tmp_path.iterdir()] == ["good"]
    monkeypatch.undo()
    export_model(model, tmp_path / "good", max_shard_size="8KB")
    assert verify_export(tmp_path / "good") == [] and _snapshot_dir(tmp_path / "good") != good


def test_files_are_flushed_before_the_manifest_and_a_failed_flush_fails(
    tmp_path: Path, monkeypatch
) -> None:
    """Each file's fsync overlaps the writing of the next: the manifest must still wait for
    all of them, and an error at fsync (EIO, a quota on a network file system) fails the
    export like one at write."""
    from pma_dist.export import _atomic as atomic
    from pma_dist.export import _hf_writer as hf

    model, good = _first_export(tmp_path)
    flushed: list[str] = []
    sealed: list[set[str]] = []
    flush, seal = hf.fsync_path, atomic.write_manifest

    def recording_flush(path: Path) -> None:
        flush(path)
        flushed.append(path.name)

    def recording_seal(temp: Path, *args, **kwargs) -> None:
        sealed.append(set(flushed))
        seal(temp, *args, **kwargs)

    monkeypatch.setattr(hf, "fsync_path", recording_flush)
    monkeypatch.setattr(atomic, "write_manifest", recording_seal)
    export_model(model, tmp_path / "next", max_shard_size="8KB")
    written = {p.name for p in (tmp_path / "next").glob("*.safetensors")}
    assert len(written) > 2 and sealed == [written]

    def failing_flush(path: Path) -> None:
        if len(flushed) == 1:
            raise OSError(5, "Input/output error")
        recording_flush(path)

    flushed.clear()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    monkeypatch.setattr(hf, "fsync_path", failing_flush)
    with pytest.raises(ExportError, match="could not write .*Input/output error"):
        export_model(model, tmp_path / "good", max_shard_size="8KB")
    assert _snapshot_dir(tmp_path / "good") == good

    monkeypatch.undo()
    write, calls = hf.write_safetensors, []

    def last_write_fails(path: Path, *args, **kwargs) -> dict:
        calls.append(path.name)
        if len(calls) == len(written):
            raise OSError(5, "Input/output error")
        return write(path, *args, **kwargs)

    monkeypatch.setattr(hf, "write_safetensors", last_write_fails)
    with pytest.raises(ExportError, match="could not write .*Input/output error"):
        export_model(model, tmp_path / "good", max_shard_size="8KB")
    assert _snapshot_dir(tmp_path / "good") == good


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.parametrize(
    "options, message", [("ro,size=1m", "not writable"), ("size=8k", "not enough disk space")]
)
def test_read_only_and_full_file_systems(tmp_path: Path, options: str, message: str) -> None:
    mount = tmp_path / "mnt"
    if not _mount_tmpfs(mount, options):
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(ExportError, match=message):
            export_model(make_model(), mount / "out")
        assert not any(mount.iterdir())
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_verify_finds_flipped_byte_truncation_and_strays(tmp_path: Path) -> None:
    model = make_model()
    export_model(model, tmp_path / "hf", max_shard_size="8KB")
    export_model(model, tmp_path / "dcp", format="dcp")
    assert run_cli("verify", str(tmp_path / "hf")).returncode == 0
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    done = run_cli("verify", str(tmp_path / "hf"))
    assert done.returncode == 1 and f"{shard.name}: sha256 differs" in done.stderr
    shard.write_bytes(bytes(data[:-7]))
    assert any("bytes, manifest says" in p for p in verify_export(tmp_path / "hf"))
    distcp = next((tmp_path / "dcp").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:-3])
    assert verify_export(tmp_path / "dcp")
    (tmp_path / "dcp" / MANIFEST).unlink()
    assert "no pma_manifest.json" in verify_export(tmp_path / "dcp")[0]
